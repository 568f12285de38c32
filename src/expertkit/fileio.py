"""Small file helpers shared by every package: atomic text writes, fsync, sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, mode: int | None = None) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` via a temporary sibling file, fsync and
    rename: never half-written. With ``mode`` the file has those permissions from its creation on
    (e.g. ``0o600`` for secret keys: never readable by others, not even briefly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
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
