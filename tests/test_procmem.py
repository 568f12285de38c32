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
    block.write(b"\1" * len(block))  # every page touched
    assert status("VmHWM") >= before + 60 * 2**20
    block.close()
    assert reset_peak()
    assert status("VmHWM") < before + 32 * 2**20  # the mark now follows the current RSS again
