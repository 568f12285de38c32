"""This process's memory figures from ``/proc`` (Linux), for benchmarks and experiments.

``ru_maxrss`` is carried over fork and exec on Linux, so a child started by a big parent reports
the parent's peak; the kernel's ``VmHWM`` mark belongs to the process and can be reset, so the
peak of one piece of work can be read alone.
"""

from __future__ import annotations


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


_TRIM: list = []  # [malloc_trim or None], looked up once


def release_free_memory() -> bool:
    """Give the C allocator's free pages back to the system (glibc ``malloc_trim(0)``); False elsewhere.

    glibc keeps freed blocks of up to 32 MB in its heap once it has seen one that size freed (its
    mmap threshold adapts), and a heap fragmented by alternating big tensors only grows: in the MoE
    compression pass that retained memory, not live tensors, was most of the peak (measured,
    docs/benchmarks.md). Trimming after each unit of streamed work keeps the resident set to what
    is alive, without changing the allocator's settings for the rest of the process.
    """
    if not _TRIM:
        import ctypes
        import ctypes.util

        try:
            fn = ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc
            fn = None
        _TRIM.append(fn)
    if _TRIM[0] is None:
        return False
    _TRIM[0](0)
    return True
