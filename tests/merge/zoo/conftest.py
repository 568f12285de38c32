"""Tiny zoos with known families for the zoo planner tests.

``tiny_zoo(root)`` writes, from tiny random Llama models:

* ``baseA`` (seed 0) and ``baseB`` = baseA plus a perturbation of relative size 0.1 on every
  weight (an "evolved" base);
* ``a0, a1, a2``: LoRA adapters (q_proj, v_proj; rank 4) on baseA, each with its own random
  factors of small size, and ``b0, b1``: LoRA adapters on baseB;
* each adapter's ``expertkit.json`` names a task, like ``train_lora`` does.

The right clustering is {a0, a1, a2} and {b0, b1}.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from expertkit.models.tiny import save_tiny, tiny_model, tiny_tokenizer

TASKS = {"a0": "family_relation", "a1": "reverse_words", "a2": "leg_count", "b0": "bbc_topic", "b1": "family_relation"}


def make_adapter(base_dir: Path, out: Path, seed: int, task: str, size: float = 0.01) -> Path:
    """A PEFT LoRA adapter on ``base_dir`` with random A and B factors (seeded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * size)
    for c in peft_model.peft_config.values():
        c.base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    (out / "expertkit.json").write_text(json.dumps({"task": task}))
    return out


def evolve_tiny(base_dir: Path, out: Path, rel: float = 0.1, seed: int = 7) -> Path:
    """A copy of the tiny base with every floating tensor perturbed by ``rel`` of its scale."""
    model = tiny_model("llama", 0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * rel * p.abs().mean())
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the tiny zoo (see the module docstring); treat as read-only."""
    root = tmp_path_factory.mktemp("zoo")
    base_a = save_tiny("llama", root / "baseA", 0)
    base_b = evolve_tiny(base_a, root / "baseB")
    paths = {"baseA": base_a, "baseB": base_b}
    (root / "experts").mkdir()
    for i, name in enumerate(["a0", "a1", "a2"]):
        paths[name] = make_adapter(base_a, root / "experts" / name, 10 + i, TASKS[name])
    for i, name in enumerate(["b0", "b1"]):
        paths[name] = make_adapter(base_b, root / "experts" / name, 20 + i, TASKS[name])
    paths["experts"] = root / "experts"
    return paths


@pytest.fixture
def dense_with_own_mlps(tmp_path):
    """``make(seeds, arch="llama")``: tiny dense folders sharing every tensor but the MLPs, which
    come from models of ``seeds`` (so an FFN mixture of them has known per-expert outputs)."""

    def make(seeds, arch: str = "llama") -> list[Path]:
        folders = []
        for k, seed in enumerate(seeds):
            other = tiny_model(arch, seed).state_dict()
            model = tiny_model(arch, 0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".mlp." in name:
                        p.copy_(other[name])
            model.save_pretrained(tmp_path / f"dense{k}")
            tiny_tokenizer().save_pretrained(tmp_path / f"dense{k}")
            folders.append(tmp_path / f"dense{k}")
        return folders

    return make


@pytest.fixture
def force_expert():
    """``force(model, k)``: every router of a loaded Mixtral / Qwen2-MoE picks expert ``k`` with weight 1."""

    def force(model, k: int) -> None:
        for layer in model.model.layers:
            gate = layer.mlp.gate

            def forward(hidden, gate=gate):
                hidden = hidden.reshape(-1, gate.hidden_dim)
                logits = torch.zeros(hidden.shape[0], gate.num_experts)
                logits[:, k] = 10.0
                return logits, torch.ones(hidden.shape[0], 1), torch.full((hidden.shape[0], 1), k)

            gate.forward = forward

    return force
