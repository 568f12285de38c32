"""train_experts + evaluate stages end to end on a tiny model and a tiny task."""

from __future__ import annotations

import json
import pytest

from expertkit.errors import ConfigError
from expertkit.pipeline import parse_run_config, run_pipeline
from expertkit.tasks.toy import lohi_task

LOHI = lohi_task()


def test_train_then_evaluate_writes_matrix_heatmap_and_verdict(tmp_path, tiny_checkpoint, lohi, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    data = {
        "name": "zoo", "model": str(tiny_checkpoint("llama")), "output_dir": str(tmp_path / "runs"),
        "stages": [
            {"kind": "train_experts", "tasks": [LOHI.name],
             "train": {"steps": 30, "lr": 0.01, "rank": 8, "batch_size": 16, "save_every": 0,
                       "target_modules": ["q_proj", "v_proj", "lm_head"]}},
            {"kind": "evaluate", "n": 40},
        ],
    }
    run_dir = run_pipeline(parse_run_config(data))
    results = json.loads((run_dir / "results.json").read_text())["stages"]
    assert (run_dir / "experts" / LOHI.name / "adapter_config.json").exists()
    ev = results["evaluate"]["result"]
    assert set(ev["matrix"]) == {"base", "expert:lo-hi"}
    expert, base = ev["matrix"]["expert:lo-hi"]["lo-hi"], ev["matrix"]["base"]["lo-hi"]
    assert expert["accuracy"] == 1.0 and expert["n"] == 40
    assert ev["own_task"]["lo-hi"]["beats_base_beyond_ci"] == (expert["ci"][0] > base["ci"][1])
    assert (run_dir / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    report = (run_dir / "report.md").read_text()
    assert "![models x tasks accuracy](heatmap.png)" in report and "| expert:lo-hi |" in report


def test_unknown_task_and_typo_reported_together():
    with pytest.raises(ConfigError) as info:
        parse_run_config({"name": "x", "stages": [
            {"kind": "train_experts", "tasks": ["revrse_words"], "train": {"stpes": 3}},
            {"kind": "evaluate", "tasks": ["gsm8"]}]})
    msg = str(info.value)
    assert "3 problems" in msg
    assert "unknown task 'revrse_words'. Did you mean 'reverse_words'?" in msg
    assert "stages[0].train.stpes: unknown key 'stpes'. Did you mean 'steps'?" in msg
    assert "unknown task 'gsm8'. Did you mean 'gsm8k'?" in msg
