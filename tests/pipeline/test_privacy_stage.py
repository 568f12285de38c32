"""The dp_train stage (DP-Flat's three parts together) end to end on a tiny model and a toy task."""

from __future__ import annotations

import json

import pytest

from expertkit.errors import ConfigError
from expertkit.pipeline import parse_run_config, run_pipeline


def test_dp_flat_all_three_parts_in_a_run(tmp_path, tiny_checkpoint, lohi, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    data = {
        "name": "private", "model": str(tiny_checkpoint("llama")), "output_dir": str(tmp_path / "runs"),
        "stages": [{
            "kind": "dp_train", "task": lohi.name, "n_public": 16, "n_private": 40, "teacher_steps": 3,
            "distill_weight": 0.1, "prefix_layers": 1, "sharpness_examples": 2, "sharpness_iters": 3,
            "eval_n": 10, "mia_n": 8,
            "train": {"scheme": "prefix", "num_virtual_tokens": 2, "steps": 3, "batch_size": 4, "save_every": 0,
                      "optimizer": "dp-adamw",
                      "optimizer_params": {"noise_multiplier": 1.0, "delta": 1e-3, "rho": 0.05}},
        }],
    }
    run_dir = run_pipeline(parse_run_config(data))
    res = json.loads((run_dir / "results.json").read_text())["stages"]["dp_train"]["result"]
    teacher = json.loads((run_dir / "private" / "lo-hi" / "teacher" / "expertkit.json").read_text())
    student = json.loads((run_dir / "private" / "lo-hi" / "student" / "expertkit.json").read_text())
    assert teacher["task"] == "lo-hi@public" and teacher["optimizer"] == "adamw"  # non-DP, public data only
    assert student["task"] == "lo-hi@private" and student["optimizer"] == "dp-adamw"
    params = student["config"]["optimizer_params"]
    assert params["teacher"].endswith("teacher") and params["distill_weight"] == 0.1 and params["rho"] == 0.05
    flattest = min(range(2), key=lambda i: res["layer_sharpness"][i])
    assert res["prefix_layers"] == params["prefix_layers"] == [flattest]
    assert res["privacy"]["private_examples"] == 40 and res["privacy"]["steps"] == 3
    assert len(res["scores"]) == 10 and 0 <= res["mia"]["auc"] <= 1 and res["mia"]["members"] == 8
    assert res["top_eigenvalue"] != 0
    assert "| lo-hi |" in (run_dir / "report.md").read_text()


def test_a_non_dp_optimizer_or_sparse_prefix_without_prefix_is_refused(tmp_path, tiny_checkpoint, lohi):
    base = {"name": "p", "model": str(tiny_checkpoint("llama")), "output_dir": str(tmp_path / "runs")}
    with pytest.raises(ConfigError, match="must be dp-sgd or dp-adamw"):
        run_pipeline(parse_run_config({**base, "stages": [{"kind": "dp_train", "task": lohi.name,
                                                            "train": {"optimizer": "adamw"}}]}))
    with pytest.raises(ConfigError, match="needs train.scheme: prefix"):
        run_pipeline(parse_run_config({**base, "stages": [{"kind": "dp_train", "task": lohi.name,
                                                            "prefix_layers": 1}]}))
