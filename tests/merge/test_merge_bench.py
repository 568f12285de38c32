"""bench/merge_vs_mergekit.py measures each tool's own peak memory, whatever the script holds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("merge_bench", ROOT / "bench" / "merge_vs_mergekit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_timed_child_does_not_inherit_the_benchmarks_peak_memory():
    bench = _bench()
    held = bytearray(400 * 1024 * 1024)  # the script's own memory, e.g. after comparing two outputs
    held[::4096] = b"\1" * len(held[::4096])  # touch every page: it counts in RSS
    wall, peak_mb = bench.timed([sys.executable, "-c", "x = bytearray(50 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])"])
    assert wall > 0
    # the child's own ~50 MB plus an interpreter, never the 400 MB held here (Linux carries
    # ru_maxrss over fork and exec: a child started straight from this process reports >= 400 MB)
    assert 50 < peak_mb < 150, peak_mb
    del held
