"""bench/moe_compress.py --profile: each phase's peak is the resident memory seen while that phase ran."""

from __future__ import annotations

import time

import numpy as np

from expertkit.procmem import status
from tests.scripts import load_script


class Work:
    def big(self):
        a = np.ones(8_000_000)  # 64 MB written, so resident
        time.sleep(0.2)  # several 2 ms samples
        return float(a[-1])

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
    assert peaks["big"][0] > 50e6  # anonymous pages of the 64 MB array
    assert peaks["small"][0] < 30e6  # the array is freed (its own mapping) before the second call
    assert Work.big.__name__ == "labelled"  # the class's function was replaced, not a copy's
