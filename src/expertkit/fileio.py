"""Small file helpers shared by every package: atomic writes, fsync, sha256, output folders.

Files and folders are written with the usual permissions (``0o666`` / ``0o777`` less the umask,
so normally 0644 / 0755), not the owner-only ones of ``tempfile``. :func:`writing` names the
output path in operating-system errors that would not (a full disk or a file-size limit while
writing), and :func:`new_folders` removes the folders it created when the write fails.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
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
    ``dest`` (same file system), as made by ``tempfile.mkdtemp(dir=dest.parent)``.
    """
    import shutil

    tmp, dest = Path(tmp), Path(dest)
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
    for p in tmp.iterdir():
        if p.is_file():
            fsync_path(p)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    import shutil

    dest = Path(dest)
    with new_folders(dest.parent), writing(dest):
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            yield tmp
            install_folder(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
