"""expertkit.procmem: this process's memory figures from /proc."""

from __future__ import annotations

import mmap
import sys

import pytest

from expertkit.procmem import reset_peak, status

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")


def test_status_reads_rss_and_peak_in_bytes():
    rss, peak = status("VmRSS"), status("VmHWM")
    assert rss > 10 * 2**20  # a Python process with pytest loaded holds more than 10 MiB
    assert peak >= rss
    assert status("NoSuchField") == 0


def test_peak_follows_a_large_allocation_and_reset_brings_it_down():
    if not reset_peak():
        pytest.skip("clear_refs is not permitted here")
    before = status("VmHWM")
    block = mmap.mmap(-1, 64 * 2**20)  # fresh anonymous pages (malloc could reuse resident ones)
    chunk = b"\1" * 2**20  # every page touched through a small buffer: a 64 MB temporary would come
    for offset in range(0, len(block), len(chunk)):  # from malloc, whose heap may keep it resident once freed
        block[offset:offset + len(chunk)] = chunk
    assert status("VmHWM") >= before + 60 * 2**20
    block.close()
    assert reset_peak()
    assert status("VmHWM") < before + 32 * 2**20  # the mark now follows the current RSS again


_CHURN = """
import ctypes, sys
from expertkit.procmem import mapped_large_allocations, status
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20
def churn():
    p = libc.malloc(16 * MB); ctypes.memset(p, 1, 16 * MB); libc.free(p)  # glibc's threshold adapts to 16 MB
    a = libc.malloc(8 * MB); ctypes.memset(a, 1, 8 * MB)
    pin = libc.malloc(64 * 1024); ctypes.memset(pin, 1, 64 * 1024)  # allocated after it
    before = status("VmRSS"); libc.free(a)
    return (before - status("VmRSS")) // MB  # what freeing the 8 MB block gave back
if sys.argv[1] == "plain":
    print(churn(), True)
else:
    with mapped_large_allocations() as on:
        print(churn(), on)
"""


def _churn(mode: str) -> tuple[int, bool]:
    import subprocess

    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True)
    back, on = out.stdout.split()
    return int(back), on == "True"


def test_mapped_large_allocations_give_freed_blocks_back():
    plain, (mapped, on) = _churn("plain")[0], _churn("mapped")
    if not on:
        pytest.skip("the C library is not glibc")
    assert plain <= 1  # the adapted threshold served the block from the heap: freeing it kept it resident
    assert mapped >= 7  # its own mapping: freed, it left the resident set
