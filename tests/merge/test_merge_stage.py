"""The pipeline's ``merge`` stage, and its merged model evaluated beside the experts."""

from __future__ import annotations

import json

import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.pipeline import parse_run_config, run_pipeline
from expertkit.registry import Entry
from expertkit.tasks.base import TASKS
from expertkit.tasks.toy import copy_task, lohi_task
from expertkit.weights import Checkpoint, lora_delta

TOYS = [lohi_task(), copy_task()]


@pytest.fixture
def toys(monkeypatch):
    import expertkit.tasks  # noqa: F401 - registers built-ins first

    for t in TOYS:
        monkeypatch.setitem(TASKS._entries, t.name, Entry(t.name, t, summary="toy"))
    return [t.name for t in TOYS]


def test_merge_stage_merges_lora_experts_and_evaluate_reports_it(tmp_path, tiny_checkpoint, toys, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    base = tiny_checkpoint("llama")
    data = {
        "name": "zoo", "model": str(base), "output_dir": str(tmp_path / "runs"),
        "stages": [
            {"kind": "train_experts", "tasks": toys,
             "train": {"steps": 4, "lr": 0.01, "rank": 4, "batch_size": 4, "save_every": 0,
                       "target_modules": ["q_proj", "v_proj"]}},
            {"kind": "merge", "method": "task_arithmetic", "params": {"lambda": 1.0}},
            {"kind": "evaluate", "n": 8},
        ],
    }
    run_dir = run_pipeline(parse_run_config(data))
    results = json.loads((run_dir / "results.json").read_text())["stages"]
    merged = run_dir / results["merge"]["result"]["path"]
    name = "model.layers.1.self_attn.q_proj.weight"
    with Checkpoint(base) as b, Checkpoint(merged) as m:
        expect = b.read(name) + sum(lora_delta(run_dir / "experts" / t)[name] for t in toys)
        torch.testing.assert_close(m.read(name), expect, atol=1e-6, rtol=0)
    assert not list((run_dir / "experts").glob("*/model.safetensors"))  # no merged copy of an expert
    ev = results["evaluate"]["result"]
    assert set(ev["matrix"]) == {"base", *(f"expert:{t}" for t in toys), "merge:task_arithmetic"}
    row = ev["matrix"]["merge:task_arithmetic"]
    assert ev["merges"]["merge:task_arithmetic"]["mean"] == pytest.approx(
        sum(c["accuracy"] for c in row.values()) / len(toys))
    report = (run_dir / "report.md").read_text()
    assert "| merge:task_arithmetic |" in report and "Merged models beside the experts" in report


def test_merge_stage_params_are_checked_without_loading_weights(tiny_checkpoint, toys):
    data = {"name": "x", "model": str(tiny_checkpoint("llama")),
            "stages": [{"kind": "merge", "method": "tie", "params": {}},
                       {"kind": "merge", "name": "m2", "method": "ties", "params": {"densty": 0.2}}]}
    with pytest.raises(ConfigError) as err:
        parse_run_config(data)
    assert "Did you mean 'ties'" in str(err.value) and "densty" in str(err.value)
