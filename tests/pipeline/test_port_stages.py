"""evolve + port stages end to end on a tiny model: experts ported to an evolved base keep their skill."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from expertkit.errors import ConfigError
from expertkit.pipeline import parse_run_config, run_pipeline
from expertkit.tasks.toy import lohi_task

LOHI = lohi_task()


def lora_deltas(adapter) -> dict[str, torch.Tensor]:
    """``{base weight name: scaling * B @ A}`` of a PEFT LoRA adapter folder, read by hand."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            out[name] = (cfg["lora_alpha"] / cfg["r"]) * (b @ a)  # (out, r) @ (r, in)
    return out


def test_experts_ported_to_an_evolved_base_keep_their_skill(tmp_path, tiny_checkpoint, lohi, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"note {i}: numbers go up and down, {i} then {i * 3}." for i in range(60)))
    data = {
        "name": "port", "model": str(tiny_checkpoint("llama")), "output_dir": str(tmp_path / "runs"),
        "stages": [
            {"kind": "train_experts", "tasks": [LOHI.name],
             "train": {"steps": 30, "lr": 0.01, "rank": 8, "batch_size": 16, "save_every": 0,
                       "target_modules": ["q_proj", "v_proj", "lm_head"]}},
            {"kind": "evolve", "corpus": str(corpus), "steps": 5, "lr": 1e-3, "seq_len": 16},
            {"kind": "port", "n": 40},
        ],
    }
    run_dir = run_pipeline(parse_run_config(data))
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    assert (run_dir / "evolved" / "README.md").is_file()
    row = stages["port"]["result"]["experts"][LOHI.name]
    assert row["relation"] == "evolved" and 0 < row["median_rel_drift"] < 0.5
    assert row["old_expert"]["accuracy"] == 1.0
    assert row["new_ported"]["accuracy"] >= 0.9 > row["new_base"]["accuracy"]
    assert "new base + ported expert" in (run_dir / "report.md").read_text()
    expert, ported = run_dir / "experts" / LOHI.name, run_dir / "ported" / LOHI.name
    deltas = lora_deltas(expert)
    assert set(deltas) == {f"{p}.weight" for p in ("lm_head", *(f"model.layers.{i}.self_attn.{m}"
                                                                 for i in (0, 1) for m in ("q_proj", "v_proj")))}
    for name, delta in lora_deltas(ported).items():  # ported without training: the very same delta
        assert torch.allclose(delta, deltas[name], atol=1e-6), name
    old, new = load_file(tiny_checkpoint("llama") / "model.safetensors"), load_file(run_dir / "evolved" / "model.safetensors")
    drifts = [float((new[n] - old[n]).norm() / old[n].norm()) for n in deltas]
    assert row["median_rel_drift"] == pytest.approx(statistics.median(drifts), rel=1e-5)

    # another run ports the same experts from their folder (as examples/portllm.yaml does)
    again = {**data, "name": "port2", "stages": [
        {"kind": "evolve", "corpus": str(corpus), "steps": 5, "lr": 1e-3, "seq_len": 16},
        {"kind": "port", "n": 40, "experts": str(run_dir / "experts")}]}
    run2 = run_pipeline(parse_run_config(again))
    row2 = json.loads((run2 / "results.json").read_text())["stages"]["port"]["result"]["experts"][LOHI.name]
    assert row2["new_ported"] == row["new_ported"] and row2["old_expert"] == row["old_expert"]


def test_port_with_an_empty_experts_folder_is_a_clear_error(tmp_path, tiny_checkpoint):
    data = {"name": "p", "model": str(tiny_checkpoint("llama")), "output_dir": str(tmp_path / "runs"),
            "stages": [{"kind": "port", "new_base": str(tiny_checkpoint("llama", 1)), "experts": str(tmp_path)}]}
    with pytest.raises(ConfigError, match="holds no expert adapters"):
        run_pipeline(parse_run_config(data))


def test_port_without_new_base_or_evolve_is_a_clear_error(tmp_path, tiny_checkpoint, lohi):
    data = {"name": "p", "model": str(tiny_checkpoint("llama")), "output_dir": str(tmp_path / "runs"),
            "stages": [{"kind": "train_experts", "tasks": [LOHI.name], "train": {"steps": 1, "save_every": 0}},
                       {"kind": "port"}]}
    with pytest.raises(ConfigError, match="no new_base given and no evolve stage"):
        run_pipeline(parse_run_config(data))
