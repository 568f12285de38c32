"""bench/merge_vs_mergekit.py measures each tool's own peak memory, whatever the script holds."""

from __future__ import annotations

import sys

from tests.scripts import load_script


def test_a_timed_child_does_not_inherit_the_benchmarks_peak_memory():
    bench = load_script("bench/merge_vs_mergekit.py")
    held = bytearray(400 * 1024 * 1024)  # the script's own memory, e.g. after comparing two outputs
    held[::4096] = b"\1" * len(held[::4096])  # touch every page: it counts in RSS
    wall, peak_mb = bench.timed([sys.executable, "-c", "x = bytearray(50 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])"])
    assert wall > 0
    # the child's own ~50 MB plus an interpreter, never the 400 MB held here (Linux carries
    # ru_maxrss over fork and exec: a child started straight from this process reports >= 400 MB)
    assert 50 < peak_mb < 150, peak_mb
    del held


def test_every_benchmarked_config_is_valid_for_both_tools(tmp_path):
    """The YAML each method's bench row runs is accepted by expertkit and by mergekit, with the same
    models, weights and densities (a typo would only show after a long run)."""
    import pytest
    import yaml

    from expertkit.merge.config import load_merge_config

    mergekit_config = pytest.importorskip("mergekit.config")
    bench = load_script("bench/merge_vs_mergekit.py")
    base, experts = tmp_path / "base", [tmp_path / f"expert{i}" for i in range(3)]
    for method in bench.SETTINGS:
        for dtype in ("float32", None):
            text = bench.config(method, base, experts, dtype)
            cfg = tmp_path / f"{method}.yaml"
            cfg.write_text(text)
            ours = load_merge_config(cfg)
            theirs = mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(text))
            assert ours.merge_method == theirs.merge_method == method
            assert [m.model for m in ours.models] == [str(e) for e in experts]
            assert (ours.base_model is None) == (method == "linear") == (theirs.base_model is None)
            assert ours.dtype == theirs.dtype == dtype
            shared, per_model, weighted = bench.SETTINGS[method]
            for m in ours.models:
                assert dict(m.parameters or {}) == {**({"weight": 1.0} if weighted else {}), **per_model}
            assert dict(ours.parameters or {}) == shared
