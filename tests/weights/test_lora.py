"""LoRA deltas read by expertkit equal PEFT's own merge_and_unload()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from expertkit.errors import CheckpointError, ConfigError, PickleRefusedError
from expertkit.weights.lora import LoraAdapter, lora_delta, match_pattern


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128))


def make_adapter(model: torch.nn.Module, config: LoraConfig, folder: Path) -> dict[str, torch.Tensor]:
    """Wrap ``model``, randomise every LoRA factor, save the adapter; return the merged state dict.

    PEFT initialises lora_B (and lora_embedding_A) to zero, which would make
    every delta zero; all factors get seeded random values instead.
    """
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(folder)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def merge_with_expertkit(base: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """Base + expertkit's deltas, with the adapter's replacements applied first."""
    out = dict(base)
    with LoraAdapter.open(folder) as adapter:
        out.update(dict(adapter.replacements()))
        for name, delta in adapter.deltas():
            out[name] = out[name] + delta
    return out


def assert_state_dicts_close(ours: dict[str, torch.Tensor], peft: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(peft)
    for name in peft:
        torch.testing.assert_close(ours[name], peft[name], atol=1e-6, rtol=0, msg=name)


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_llama_q_v_matches_merge_and_unload(tmp_path: Path) -> None:
    model = tiny_llama()
    base = base_state(model)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    merged = make_adapter(model, cfg, tmp_path)
    ours = merge_with_expertkit(base, tmp_path)
    assert_state_dicts_close(ours, merged)
    changed = {n for n in base if not torch.equal(base[n], merged[n])}
    with LoraAdapter.open(tmp_path) as adapter:
        assert {n for n, _ in adapter.deltas()} == changed
        assert len(changed) == 4
        assert adapter.target_modules == ["q_proj", "v_proj"]
        assert all(m.scale == 4.0 for m in adapter.modules)


def test_llama_rank_and_alpha_patterns(tmp_path: Path) -> None:
    model = tiny_llama()
    base = base_state(model)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6},
        alpha_pattern={r"layers\.1\..*v_proj": 3, "q_proj": 5},
    )
    merged = make_adapter(model, cfg, tmp_path)
    assert_state_dicts_close(merge_with_expertkit(base, tmp_path), merged)
    with LoraAdapter.open(tmp_path) as adapter:
        got = {m.module: (m.r, m.alpha, m.kind) for m in adapter.modules}
    assert got == {
        "model.embed_tokens": (4, 8.0, "embedding"),
        "model.layers.0.self_attn.q_proj": (2, 5.0, "linear"),
        "model.layers.0.self_attn.v_proj": (6, 8.0, "linear"),
        "model.layers.1.self_attn.q_proj": (4, 5.0, "linear"),
        "model.layers.1.self_attn.v_proj": (6, 3.0, "linear"),
    }


def test_llama_rslora(tmp_path: Path) -> None:
    model = tiny_llama()
    base = base_state(model)
    cfg = LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj"])
    merged = make_adapter(model, cfg, tmp_path)
    assert_state_dicts_close(merge_with_expertkit(base, tmp_path), merged)
    with LoraAdapter.open(tmp_path) as adapter:
        assert all(m.scale == 3.0 for m in adapter.modules)  # 6 / sqrt(4)


def test_gpt2_lora_bias_and_modules_to_save(tmp_path: Path) -> None:
    model = tiny_gpt2()
    base = base_state(model)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
        lora_bias=True, modules_to_save=["ln_f"],
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(tmp_path)
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    assert_state_dicts_close(merge_with_expertkit(base, tmp_path), merged)
    with LoraAdapter.open(tmp_path) as adapter:
        assert adapter.replacement_names() == ["transformer.ln_f.bias", "transformer.ln_f.weight"]
        assert "transformer.h.1.attn.c_attn.bias" in dict(adapter.deltas())


def test_gpt2_fan_in_fan_out(tmp_path: Path) -> None:
    model = tiny_gpt2()
    base = base_state(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")
    merged = make_adapter(model, cfg, tmp_path)
    assert_state_dicts_close(merge_with_expertkit(base, tmp_path), merged)
    deltas = lora_delta(tmp_path)
    assert deltas["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D (in, out)


def test_mixed_conv1d_and_linear_aligned_from_base_shapes(tmp_path: Path) -> None:
    """PEFT flips fan_in_fan_out per module type; the saved flag then fits only some modules."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, tie_word_embeddings=False))
    base = base_state(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True)
    merged = make_adapter(model, cfg, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    with LoraAdapter.open(tmp_path) as adapter:
        adapter.align_to({n: tuple(t.shape) for n, t in base.items()})
        ours = dict(base)
        for name, delta in adapter.deltas():
            ours[name] = ours[name] + delta
    assert_state_dicts_close(ours, merged)


def test_factors_reproduce_deltas(tmp_path: Path) -> None:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    make_adapter(tiny_gpt2(), cfg, tmp_path / "gpt2")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    make_adapter(tiny_llama(), cfg, tmp_path / "llama")
    for folder in ("gpt2", "llama"):
        with LoraAdapter.open(tmp_path / folder) as adapter:
            dense = dict(adapter.deltas())
            for name, a_scaled, b in adapter.factors():
                torch.testing.assert_close(b @ a_scaled, dense[name], atol=1e-6, rtol=0)


def test_match_pattern_follows_peft() -> None:
    patterns = {"q_proj": 1, r"layers\.1\.self_attn\.v_proj": 2}
    assert match_pattern(patterns, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert match_pattern(patterns, "model.layers.1.self_attn.v_proj") == r"layers\.1\.self_attn\.v_proj"
    assert match_pattern(patterns, "model.layers.0.self_attn.v_proj") is None
    assert match_pattern({"proj": 1}, "model.layers.0.self_attn.q_proj") is None  # dot-aligned suffix only
    assert match_pattern({"layers.1": 1}, "model.layers.11") is None  # "." is a regex dot, but $ anchors


def test_dora_refused(tmp_path: Path) -> None:
    cfg = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="use_dora"):
        LoraAdapter.open(tmp_path)


def test_other_peft_type_refused(tmp_path: Path) -> None:
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    conf["peft_type"] = "IA3"
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="IA3"):
        LoraAdapter.open(tmp_path)


def test_pickle_adapter_refused(tmp_path: Path) -> None:
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        LoraAdapter.open(tmp_path)
    with LoraAdapter.open(tmp_path, allow_pickle=True) as adapter:
        assert len(adapter.modules) == 2


def test_missing_config_and_missing_factor(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        LoraAdapter.open(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 3)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="no lora_B"):
        LoraAdapter.open(tmp_path)


def test_rank_mismatch_between_config_and_tensors(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    save_file(
        {"base_model.model.x.lora_A.weight": torch.zeros(2, 3), "base_model.model.x.lora_B.weight": torch.zeros(5, 2)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="r=4"):
        LoraAdapter.open(tmp_path)


def test_hand_placed_delta(tmp_path: Path) -> None:
    """delta = (alpha / r) * B @ A on numbers small enough to check by hand."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2}))
    a = torch.tensor([[1.0, 2.0, 3.0]])  # (r=1, in=3)
    b = torch.tensor([[1.0], [-1.0]])  # (out=2, r=1)
    save_file(
        {"base_model.model.lin.lora_A.weight": a, "base_model.model.lin.lora_B.weight": b},
        str(tmp_path / "adapter_model.safetensors"),
    )
    assert set(lora_delta(tmp_path)) == {"lin.weight"}
    torch.testing.assert_close(
        lora_delta(tmp_path)["lin.weight"], torch.tensor([[2.0, 4.0, 6.0], [-2.0, -4.0, -6.0]]), atol=0, rtol=0
    )
