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
