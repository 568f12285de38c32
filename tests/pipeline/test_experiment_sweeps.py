"""An experiment's sweep on the package's local Ray gives the results of the in-process run.

experiments/mc_smoe.py --smoke with a small grid (frequency pruning at E' = 4, one C-step setting, no
distillation): its cell runs in this process, then on Ray into another folder; every number of
results.json must be the same (only the folders differ). The two runs share ``$EXPERTKIT_CACHE``, so
the Ray run's routing statistics and evaluations of identical models come from the cache; its
compressions and held-out NLL are computed again in the worker.
"""

from __future__ import annotations

import os

from tests.scripts import load_script


ARGV = ["--smoke", "--experts", "4", "--methods", "prune_frequency", "--sparse-shares", "0", "--kd-methods", "msmoe"]


def _numbers(res: dict) -> dict:
    """results.json less what names the run (folders, arguments, wall time)."""
    systems = [{k: v for k, v in row.items() if k != "folder"} for row in res["systems"]]
    return {**{k: v for k, v in res.items() if k not in ("moe", "args", "minutes", "systems")}, "systems": systems}


def test_mc_smoe_smoke_on_ray_equals_the_local_run(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    exp = load_script("experiments/mc_smoe.py")
    here = exp.main([*ARGV, "--out", str(tmp_path / "local")])
    there = exp.main([*ARGV, "--out", str(tmp_path / "ray"), "--executor", "ray"])
    assert [r["label"] for r in here["systems"]] == ["prune_frequency-4", "prune_frequency-4-C"]
    assert _numbers(there) == _numbers(here)
    assert there["systems"][0]["folder"] == str(tmp_path / "ray" / "models" / "prune_frequency-4")
    log = (tmp_path / "ray" / "logs" / "prune_frequency-4.log").read_text()
    assert "=== prune_frequency-4: attempt 1/" in log and f"pid {os.getpid()} " not in log  # ran in a worker
