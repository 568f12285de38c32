"""experiments/mc_smoe.py --smoke: the whole experiment on a tiny random 8-expert MoE."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from expertkit.pipeline.sweep import SweepError
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
    # the cells read the routing statistics and REAP scores back from <out>/calibration; the direct path
    # (one calibration in memory, as before the cells) compresses and distills the same model, bit for bit
    from expertkit.models import load_model
    from expertkit.moe.compress import CompressConfig, calibrate, compress_moe
    from expertkit.tasks.evaluate import evaluate
    from expertkit.tasks.perplexity import block_nll, heldout_blocks, perplexity

    folder, row = tmp_path / "run" / "moe", rows["msmoe-4-C-KD"]
    base = {"model": str(folder), "seed": 0, "stock": False,
            "calibration": {"tasks": ["add_sub", "gcd"], "n": 4, "split": "validation"}}
    stats, reap = calibrate(CompressConfig(**{**base, "method": "reap"}), folder)
    cfg = CompressConfig(**{**base, "method": "msmoe", "experts_per_layer": 4,
                            "lowrank": {"keep": 0.4, "sparse_share": row["sparse_share"]},
                            "kd": {"steps": 2, "lr": 1e-4, "batch_size": 2}})
    direct = compress_moe(cfg, tmp_path / "direct", stats=stats, reap=reap).path
    weights = sorted(p.name for p in direct.glob("*.safetensors"))
    assert weights and all((direct / w).read_bytes() == (Path(row["folder"]) / w).read_bytes() for w in weights)
    loaded = load_model(direct)
    for task in ("add_sub", "gcd"):
        ev = evaluate(loaded, None, task, split="test", n=res["n"], seed=0, batch_size=64)  # not from the cache
        assert sum(ev.scores) / len(ev.scores) == row["accuracy"][task]
    assert perplexity(block_nll(loaded.model, heldout_blocks(loaded.tokenizer, n_blocks=4))) == row["perplexity"]
    # a rerun is served by the cells' files: nothing is compressed or written again
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").iterdir()}
    assert sorted(stamps) == ["msmoe-4.json", "prune_frequency-4.json"]
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").iterdir()} == stamps
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["systems"] == res["systems"] and again["moe_digest"] == res["moe_digest"]
    # the cells are tied to the MoE's weights: another MoE's results are refused, not mixed in
    (tmp_path / "run" / "results.json").write_text(json.dumps({**again, "moe_digest": "0" * 32}))
    with pytest.raises(SweepError, match="holds results of another MoE"):
        runpy.run_path(str(SCRIPT), run_name="__main__")
