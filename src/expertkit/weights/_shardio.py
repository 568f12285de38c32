"""Low-level byte I/O of the sharded writer: tensor bytes, positioned writes, in-kernel copies,
preallocation and background fsync.

Measured choices (``bench/weights_io.py``, figures and commands in docs/benchmarks.md):

* a finished shard is fsynced and closed on a background thread while the next shard is written,
  so the disk flushes one shard while the CPU copies the next; the writer waits for every fsync
  before its atomic rename. This was the one change that moved the durable write (1.95 s -> 1.56 s
  for 538 MB at load average 4.8);
* shard files of known size are preallocated with ``fallocate(2)`` so that a full disk (or a
  file-size limit) fails when the writer starts, before any work, instead of half-way. It made no
  measurable difference to speed on ext4 (1.47 s sparse vs 1.56 s preallocated, within noise);
* starting writeback early after each tensor (``sync_file_range``) was tried and not kept (slower).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from expertkit.errors import CheckpointError, InputTypeError

CHUNK = 16 * 1024 * 1024
_MAX_IO = 1 << 30  # bytes per write call (Linux moves at most ~2 GiB per call anyway)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a CPU tensor's data, sharing its memory (copies only if needed)."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"expected a torch.Tensor, got {type(t).__name__}.")
    if t.layout != torch.strided or t.is_meta:
        raise CheckpointError(f"cannot save a {t.layout}/meta tensor; make it a dense tensor with data.")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)  # (numel,)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())  # (nbytes,)


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of ``buf`` at ``offset`` (retrying partial writes)."""
    while len(buf):
        n = os.pwrite(fd, buf[:_MAX_IO], offset)
        buf, offset = buf[n:], offset + n


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Read up to ``len(buf)`` bytes at ``offset`` into ``buf``; returns the count (short only at EOF)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:done + _MAX_IO]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def copy_all(src: int, dst: int, count: int, dst_offset: int, src_offset: int = 0) -> None:
    """Copy ``count`` bytes from ``src_offset`` in ``src`` to ``dst_offset`` in ``dst`` in bounded chunks."""
    done = 0
    while done < count:
        try:  # in-kernel copy; falls back to pread/pwrite where unsupported
            n = os.copy_file_range(src, dst, min(CHUNK * 4, count - done), src_offset + done, dst_offset + done)
        except OSError:
            n = 0
        if n <= 0:
            chunk = os.pread(src, min(CHUNK, count - done), src_offset + done)
            if not chunk:
                raise CheckpointError("a source file ended early while writing a shard; was it truncated, or "
                                      "is the disk full?")
            pwrite_all(dst, memoryview(chunk), dst_offset + done)
            n = len(chunk)
        done += n


@dataclass(frozen=True)
class FileRange:
    """``nbytes`` bytes at ``offset`` of the open file ``fd``: tensor data copied file to file."""

    fd: int
    offset: int
    nbytes: int


def put(fd: int, data: memoryview | FileRange, offset: int) -> None:
    """Write ``data`` (bytes in memory, or a :class:`FileRange` copied in the kernel) at ``offset``."""
    if isinstance(data, FileRange):
        copy_all(data.fd, fd, data.nbytes, offset, data.offset)
    else:
        pwrite_all(fd, data, offset)


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate()
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def preallocate(fd: int, size: int, path: str = "") -> None:
    """Allocate ``size`` bytes of ``fd`` on disk with ``fallocate(2)`` (mode 0: the file grows to at
    least ``size``, contents read as zeros). Where the file system or the OS cannot (no fallocate,
    EOPNOTSUPP), nothing happens: the writes allocate as they go. ``posix_fallocate`` is not used
    because glibc emulates it by writing into every block where the file system lacks support.
    A full disk (ENOSPC) or a file-size limit (EFBIG) raises :class:`OSError` now, before any data
    is written."""
    if _FALLOCATE is None or size <= 0:
        return
    if _FALLOCATE(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in _NO_SPACE:
            raise OSError(err, f"cannot allocate {size} bytes: {os.strerror(err)}", path)


class Flusher:
    """fsync-and-close files on one background thread; :meth:`wait` re-raises the first failure.

    Files are handed over with :meth:`submit` and belong to the flusher from then on (it closes
    them whether the fsync succeeds or not).
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()

    @staticmethod
    def _sync(fd: int) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def submit(self, fd: int) -> None:
        """fsync and close ``fd`` in the background."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expertkit-fsync")
            self._futures.append(self._pool.submit(self._sync, fd))

    def wait(self) -> None:
        """Wait for every submitted fsync; raise the first error."""
        with self._lock:
            futures, self._futures = self._futures, []
        errors = [f.exception() for f in futures]
        self.close()
        for exc in errors:
            if exc is not None:
                raise exc

    def close(self) -> None:
        """Stop the thread once queued files are closed (their fsyncs still run). Safe to call twice."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(RuntimeError):  # interpreter shutdown
                pool.shutdown(wait=True)
