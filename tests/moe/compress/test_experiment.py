"""experiments/mc_smoe.py --smoke: the whole experiment on a tiny random 8-expert MoE."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

from expertkit.tasks.paired import mcnemar_sample_size

SCRIPT = Path(__file__).resolve().parents[3] / "experiments" / "mc_smoe.py"


def test_experiment_smoke_run_compares_systems_at_equal_parameters(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["mc_smoe.py", "--smoke", "--out", str(tmp_path / "run"), "--experts", "4",
                                      "--methods", "msmoe", "prune_frequency", "--sparse-shares", "0", "0.2",
                                      "--kd-methods", "msmoe"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["label"]: r for r in res["systems"]}
    assert set(rows) == {"msmoe-4", "msmoe-4-C", "msmoe-4-C-KD", "prune_frequency-4", "prune_frequency-4-C"}
    # equal allocation: merged and pruned models hold the same expert parameters, exactly
    assert rows["msmoe-4"]["expert_parameters"]["after"] == rows["prune_frequency-4"]["expert_parameters"]["after"]
    assert rows["msmoe-4"]["expert_parameters"]["removed_share"] == 0.5
    for label in ("msmoe-4-C", "msmoe-4-C-KD", "prune_frequency-4-C"):
        assert rows[label]["expert_parameters"]["removed_share"] >= 0.8 and rows[label]["lowrank_keep"] == 0.4
    # the distilled system starts from the C-step setting chosen on validation
    assert rows["msmoe-4-C-KD"]["sparse_share"] == rows["msmoe-4-C"]["sparse_share"] in (0.0, 0.2)
    # n per task from the validation pilot's discordance (the smoke run asks for a 0.4 difference)
    pooled = mcnemar_sample_size(0.4, min(1.0, max(res["pilot_discordance"], 0.8)))
    assert res["n"] == max(6, -(-pooled // 2))
    assert all(r["vs_original"]["n"] == 2 * res["n"] for r in rows.values())
    assert (tmp_path / "run" / "pareto.png").stat().st_size > 1000
    assert "M-SMoE ahead of prune_frequency-4-C at equal parameters" in capsys.readouterr().out
