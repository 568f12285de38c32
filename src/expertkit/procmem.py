"""This process's memory figures from ``/proc`` (Linux), for benchmarks and experiments.

``ru_maxrss`` is carried over fork and exec on Linux, so a child started by a big parent reports
the parent's peak; the kernel's ``VmHWM`` mark belongs to the process and can be reset, so the
peak of one piece of work can be read alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def status(key: str) -> int:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM``, ...) in bytes; 0 when absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset this process's peak-RSS mark (``VmHWM``) to its current RSS; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


_LIBC: list = []  # [glibc or None], looked up once


def _glibc():
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None)
            lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):  # not glibc
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]


def release_free_memory() -> bool:
    """Give the C allocator's free pages back to the system (glibc ``malloc_trim(0)``); False elsewhere.

    glibc keeps freed blocks of up to 32 MB in its heap once it has seen one that size freed (its
    mmap threshold adapts), and a heap fragmented by alternating big tensors only grows: in the MoE
    compression pass that retained memory, not live tensors, was most of the peak (measured,
    docs/benchmarks.md). Trimming after each unit of streamed work keeps the resident set to what
    is alive, without changing the allocator's settings for the rest of the process.
    """
    lib = _glibc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for its adaptive threshold on 64-bit systems


@contextmanager
def mapped_large_allocations(threshold: int = 1 << 20) -> Iterator[bool]:
    """Within the block, blocks of at least ``threshold`` bytes get their own mapping (glibc).

    Freed, such a block goes back to the system at once, so the resident set follows what is alive.
    Without this glibc raises its mmap threshold to the size of each mapped block freed (up to
    32 MB) and serves later big tensors from its heap, whose freed holes stay resident: in the MoE
    compression pass that retained memory, between trims, was a fifth of the peak (measured,
    docs/benchmarks.md). glibc cannot turn the adaptation back on, so on leaving the threshold is
    set to 32 MB, its adaptive ceiling; the process keeps that fixed value (and a trim threshold
    that no longer adapts), so its heap may keep more freed memory resident than before: seen
    once, a 64 MB temporary stayed resident in a long pytest process. Yields False, changing
    nothing, where the C library is not glibc.
    """
    lib = _glibc()
    if lib is None or not lib.mallopt(_M_MMAP_THRESHOLD, int(threshold)):
        yield False
        return
    try:
        yield True
    finally:
        lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
