"""FFN-level mixture of dense Qwen2 models: a Qwen2MoeForCausalLM that transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.merge.mixture import dense_to_mixtral, dense_to_moe, moe_config
from expertkit.models.tiny import save_tiny

IDS = torch.tensor([[5, 17, 30, 44, 9, 60, 71], [8, 8, 90, 3, 21, 64, 100]])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_qwen2_mixture_of_identical_models_gives_the_dense_logits(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM

    dense_dir = save_tiny("qwen2", tmp_path / "dense", 3)
    router = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    out = dense_to_moe([dense_dir] * 3, tmp_path / "moe", routers={0: router, 1: -router}, top_k=2)
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(moe, Qwen2MoeForCausalLM)
    cfg = moe.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.shared_expert_intermediate_size) == (3, 2, 0)
    assert cfg.norm_topk_prob and cfg.moe_intermediate_size == 128
    assert torch.equal(moe.model.layers[1].mlp.gate.weight, -router)  # the given router was loaded
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_qwen2_mixture_with_a_router_fixed_on_expert_k_equals_dense_model_k(tmp_path, dense_with_own_mlps, force_expert):
    from transformers import AutoModelForCausalLM

    folders = dense_with_own_mlps([1, 2, 3], arch="qwen2")
    moe = AutoModelForCausalLM.from_pretrained(dense_to_moe(folders, tmp_path / "moe")).eval()
    logits = []
    for k, folder in enumerate(folders):
        force_expert(moe, k)
        dense = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            got = moe(IDS).logits
            torch.testing.assert_close(got, dense(IDS).logits, rtol=0, atol=1e-5)
        logits.append(got)
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)  # the experts really differ


def test_qwen2_mixture_files_hold_experts_router_and_a_disabled_shared_expert(tmp_path):
    from safetensors import safe_open

    a, b = save_tiny("qwen2", tmp_path / "a", 1), save_tiny("qwen2", tmp_path / "b", 2)
    out = dense_to_moe([a, b], tmp_path / "moe")
    with safe_open(b / "model.safetensors", "pt") as fb, safe_open(out / "model.safetensors", "pt") as fo:
        assert torch.equal(fo.get_tensor("model.layers.1.mlp.experts.1.up_proj.weight"),
                           fb.get_tensor("model.layers.1.mlp.up_proj.weight"))
        assert fo.get_tensor("model.layers.0.mlp.shared_expert.down_proj.weight").shape == (64, 0)
        assert torch.equal(fo.get_tensor("model.layers.0.mlp.shared_expert_gate.weight"), torch.zeros(1, 64))
        assert torch.equal(fo.get_tensor("model.layers.0.mlp.gate.weight"), torch.zeros(2, 64))
        assert "model.layers.0.mlp.up_proj.weight" not in fo.keys()
        assert "model.layers.0.self_attn.q_proj.bias" in fo.keys()  # Qwen2's attention biases are kept
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"


def test_architectures_without_an_moe_counterpart_are_refused_clearly(tmp_path):
    gpt2 = save_tiny("gpt2", tmp_path / "g", 1)
    with pytest.raises(ConfigError, match=r"MoE counterpart.*qwen2.*'gpt2'"):
        dense_to_moe([gpt2, gpt2], tmp_path / "moe")
    with pytest.raises(ConfigError, match="MLP biases"):
        moe_config({"model_type": "llama", "mlp_bias": True}, 2, 1)
    qwen = save_tiny("qwen2", tmp_path / "q", 1)
    with pytest.raises(ConfigError, match="dense_to_moe picks Qwen2-MoE"):
        dense_to_mixtral([qwen, qwen], tmp_path / "moe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "q"]


@pytest.mark.parametrize(("arch", "kind"), [("qwen2", "ffn"), ("gpt2", "model")])
def test_planner_keeps_ffn_only_for_architectures_with_an_moe_counterpart(tmp_path, arch, kind):
    from expertkit.merge.zoo import plan_zoo

    for k in range(2):
        save_tiny(arch, tmp_path / "zoo" / f"m{k}", k + 1)
    plan = plan_zoo([tmp_path / "zoo"], ["family_relation"], threshold=1e-12, mixture="ffn",
                    evaluator_factory=lambda folder, tasks: (lambda tensors: 0.5), progress=False)
    assert len(plan.clusters) == 2
    assert plan.mixture.kind == kind
    notes = [line for line in plan.incompatible if line.startswith("mixture:")]
    assert bool(notes) == (kind == "model")
    if notes:
        assert "'gpt2'" in notes[0] and "model-level router" in notes[0]
