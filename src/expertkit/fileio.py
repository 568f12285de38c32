"""Small file helpers shared by every package: atomic writes, fsync, sha256, output folders.

Files and folders are written with the usual permissions (``0o666`` / ``0o777`` less the umask,
so normally 0644 / 0755), not the owner-only ones of ``tempfile``. :func:`writing` names the
output path in operating-system errors that would not (a full disk or a file-size limit while
writing), and :func:`new_folders` removes the folders it created when the write fails.
Temporary sibling folders (:func:`temp_sibling`) carry their owner process in their name, so
that a later write to the same place removes those of killed processes (:func:`sweep_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process umask, read from ``/proc`` where it can be (``os.umask`` changes it to read it,
    which another thread could observe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, mode: int | None = None) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` via a temporary sibling file, fsync and
    rename: never half-written. The file gets the usual permissions (``0o666`` less the umask); with
    ``mode`` it has those permissions from its creation on (e.g. ``0o600`` for secret keys: never
    readable by others, not even briefly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~umask())  # mkstemp makes 0600
        with writing(path), os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block: processes
    on one machine that would build the same cached artefact take turns, and the later ones find it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def install_folder(tmp: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """fsync the files of the finished folder ``tmp``, then move it to ``dest``.

    An existing ``dest`` is replaced only now that ``tmp`` is complete: it is renamed aside,
    ``tmp`` is renamed into place, and the old folder is removed. ``tmp`` must be a sibling of
    ``dest`` (same file system), as made by :func:`temp_sibling` (or ``tempfile.mkdtemp(dir=dest.parent)``).
    """
    tmp, dest = Path(tmp), Path(dest)
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
    for p in tmp.iterdir():
        if p.is_file():
            fsync_path(p)
    fsync_path(tmp)
    replace_folder(tmp, dest)


def replace_folder(tmp: Path, dest: Path) -> None:
    """Rename the finished folder ``tmp`` to ``dest``; an existing ``dest`` is moved aside first
    (to an owner-named ``.old-`` sibling that :func:`sweep_stale` recognises) and removed after."""
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.old-{owner_tag()}-{secrets.token_hex(4)}"
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    fsync_path(dest.parent)
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()


# ------------------------------------------------------------------ temporary sibling folders
# A temporary folder beside ``dest`` is named ``.{dest.name}.{kind}-{pid}-{start}-{host}-{random}``:
# the owner's pid, its start time (clock ticks after boot, from /proc/PID/stat, 0 where there is
# no /proc) and a tag of the kernel instance (boot id and pid namespace), so that a later write
# to the same place can tell a folder left by a killed process (sweep it) from one a live process
# is still writing (keep it), even after the pid has been reused. A folder from another boot,
# machine or pid namespace is never removed: its owner cannot be checked from here.
_KIND = re.compile(r"[a-z]+")


def _proc_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of a process, or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _host_tag() -> str:
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def owner_tag() -> str:
    """``{pid}-{start}-{host}``: who owns a temporary folder this process makes."""
    info = _proc_start(os.getpid())
    return f"{os.getpid()}-{info[1] if info else 0}-{_host_tag()}"


def _stale(match: re.Match[str], host: str) -> bool:
    """Whether the owner recorded in a temporary folder's name is certainly gone."""
    pid, start = int(match["pid"]), int(match["start"])
    if match["host"] != host:
        return False  # another boot, machine or pid namespace: cannot check, keep
    if pid == os.getpid():
        mine = _proc_start(pid)
        return mine is not None and mine[1] != start  # our pid, but an earlier process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        pass
    info = _proc_start(pid)
    if info is None:
        return False
    state, now = info
    return state in ("Z", "X") or (start != 0 and now != start)  # a zombie, or the pid was reused


def disk_usage(path: str | os.PathLike[str]) -> int:
    """Bytes a file or folder occupies on disk (allocated blocks; links are not followed)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def human_bytes(nbytes: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{int(nbytes)} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def sweep_stale(dest: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """Remove the temporary sibling folders of ``dest`` left by processes that are gone.

    Only folders named by :func:`temp_sibling` are considered, and only those whose owner is
    certainly dead (see above); a ``.old-`` folder (the previous ``dest``, moved aside by a replace
    that was killed) is removed only when ``dest`` exists again, otherwise it is kept and named in
    the notice. Prints one line on stderr (unless quiet) saying what was removed and how much
    space it freed; returns ``(path, bytes)`` of each removed folder.
    """
    dest = Path(dest)
    pattern = re.compile(re.escape(f".{dest.name}.") + r"(?P<kind>[a-z]+)-(?P<pid>\d+)-(?P<start>\d+)"
                         r"-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}")
    try:
        siblings = sorted(dest.parent.iterdir())
    except OSError:
        return []
    host, removed, kept = _host_tag(), [], []
    for path in siblings:
        match = pattern.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir() or not _stale(match, host):
            continue
        if match["kind"] == "old" and not dest.exists():
            kept.append(path)
            continue
        size = disk_usage(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append((path, size))
    if removed or kept:
        from expertkit.progress import is_quiet

        if not is_quiet():
            parts = []
            if removed:
                parts.append(f"removed {len(removed)} temporary folder(s) left by killed writes to {dest} "
                             f"({human_bytes(sum(s for _, s in removed))} freed): "
                             + ", ".join(p.name for p, _ in removed))
            if kept:
                parts.append(f"kept {', '.join(p.name for p in kept)}: the previous {dest.name}, moved aside "
                             f"by a killed replace; rename it to {dest.name} to restore it")
            print("expertkit: " + "; ".join(parts), file=sys.stderr)
    return removed


def temp_sibling(dest: str | os.PathLike[str], kind: str = "tmp") -> Path:
    """Create an empty hidden folder beside ``dest`` (same file system, so it can be renamed onto
    ``dest``), named with this process as its owner, after sweeping stale ones (:func:`sweep_stale`).

    ``kind`` names what it is for (``tmp``, ``template``, ...; lower-case letters).
    """
    if not _KIND.fullmatch(kind):
        raise ValueError(f"temporary folder kind {kind!r}: use lower-case letters")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest)
    tag = owner_tag()
    while True:
        path = dest.parent / f".{dest.name}.{kind}-{tag}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Make the operating-system errors of the block name ``path``.

    A write that fails for lack of space or a file-size limit raises ``OSError`` without a file
    name, and safetensors reports its I/O errors as ``SafetensorError("... (os error 27)")``;
    both leave the user guessing where. Inside this block they become an ``OSError`` with the
    same errno and ``filename=path`` (errors that already name a file pass unchanged).
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), os.fspath(path)) from exc
        raise
    except Exception as exc:
        found = _RUST_OS_ERROR.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), os.fspath(path)) from exc


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise the ``OSError`` that writing ``path`` would meet at its nearest existing ancestor: a
    file where a folder is needed, a read-only file system, no write permission. Call it before
    long work (training) whose result goes to ``path``."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    if os.statvfs(ancestor).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(ancestor))


@contextlib.contextmanager
def new_folders(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Create ``folder`` and its missing parents; if the block fails, remove again the ones this
    call created (when empty), so a failed write leaves no empty folders behind."""
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for made in missing:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()
        raise


@contextlib.contextmanager
def staged_folder(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder in a temporary sibling (yielded) and install it as ``dest`` when the block
    succeeds (:func:`install_folder`); on failure the temporary folder, and the parents this call
    created, are removed, and operating-system errors name ``dest`` (:func:`writing`)."""
    dest = Path(dest)
    with new_folders(dest.parent), writing(dest):
        tmp = temp_sibling(dest)  # owner-named: swept by a later write if this process is killed
        try:
            yield tmp
            install_folder(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
