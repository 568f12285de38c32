"""bench/moe_compress.py --profile: each phase's peak is the resident memory seen while that phase ran."""

from __future__ import annotations

import mmap
import time

from expertkit.procmem import status
from tests.scripts import load_script


class Work:
    def big(self):
        # its own anonymous mapping, every page written: resident whatever the allocator holds already
        # (an allocation through malloc may reuse freed heap pages that an earlier test left resident)
        block = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for i in range(0, len(block), mmap.PAGESIZE):
            block[i] = 1
        time.sleep(0.2)  # several 2 ms samples
        block.close()  # unmapped: out of the resident set
        return 1.0

    def small(self):
        time.sleep(0.2)
        return 0.0


def test_phases_get_the_peaks_seen_while_they_ran():
    bench = load_script("bench/moe_compress.py")
    phases = bench._Phases()
    phases.wrap(Work, "big", "big")
    phases.wrap(Work, "small", "small")
    phases.start(status("RssAnon"), status("RssFile"))
    w = Work()
    w.small()
    w.big()
    w.small()
    peaks = phases.stop()
    assert set(peaks) >= {"big", "small"}
    assert peaks["big"][0] > 50e6  # the 64 MB mapping's anonymous pages
    assert peaks["small"][0] < 30e6  # unmapped before the second call
    assert Work.big.__name__ == "labelled"  # the class's function was replaced, not a copy's
