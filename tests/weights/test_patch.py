"""Patches: construction from LoRA and task vectors, atomic save, validated load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import expertkit.weights.patch as patch_module
from expertkit.errors import CheckpointError, IncompatibleModelsError
from expertkit.weights.fingerprint import FINGERPRINT_METADATA_KEY, fingerprint
from expertkit.weights.patch import Patch


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture
def lora_setup(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(base folder, adapter folder, PEFT's merged state dict) with randomised factors."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"], rank_pattern={"v_proj": 2},
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return tmp_path / "base", tmp_path / "adapter", merged


def assert_patches_equal(a: Patch, b: Patch) -> None:
    assert a._meta() == b._meta()
    for name in a.deltas:
        assert torch.equal(a.deltas[name], b.deltas[name]) and a.deltas[name].dtype == b.deltas[name].dtype
    for name in a.replacements:
        assert torch.equal(a.replacements[name], b.replacements[name])
    for name, (fa, fb) in a.factors.items():
        assert torch.equal(fa, b.factors[name][0]) and torch.equal(fb, b.factors[name][1])


def test_lora_patch_applies_like_merge_and_unload(lora_setup) -> None:
    base, adapter, merged = lora_setup
    patch = Patch.from_lora(adapter, base=base)
    assert patch.kind == "lora"
    assert patch.base_fingerprint == fingerprint(base)
    assert patch.target_modules == ["embed_tokens", "q_proj", "v_proj"]
    assert set(patch.factors) == {
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")),
    }
    assert patch.factors["model.layers.0.self_attn.v_proj.weight"][0].shape == (2, 32)  # A: (r, in)
    assert set(patch.replacements) == {"lm_head.weight", "model.embed_tokens.weight"}
    ours = dict(patch.apply(base))
    assert set(ours) == set(merged)
    for name in merged:
        torch.testing.assert_close(ours[name], merged[name], atol=1e-6, rtol=0, msg=name)


def test_gpt2_patch_with_mixed_layouts(tmp_path: Path) -> None:
    """c_attn is a Conv1D (transposed), lm_head a Linear; the base shapes settle each."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    patch = Patch.from_lora(tmp_path / "adapter", base=tmp_path / "base")
    a, b = patch.factors["transformer.h.0.attn.c_attn.weight"]
    assert (b @ a).shape == (32, 96)  # Conv1D layout (in, out)
    ours = dict(patch.apply(tmp_path / "base"))
    for name in ours:
        torch.testing.assert_close(ours[name], merged[name], atol=1e-6, rtol=0, msg=name)


def test_save_load_round_trip_is_exact(lora_setup, tmp_path: Path) -> None:
    base, adapter, _ = lora_setup
    patch = Patch.from_lora(adapter, base=base)
    patch.deltas["extra.bias"] = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    out = patch.save(tmp_path / "p")
    assert sorted(p.name for p in out.iterdir()) == ["patch.json", "patch.safetensors"]
    loaded = Patch.load(out)
    assert_patches_equal(patch, loaded)
    assert loaded.created_at == patch.created_at and loaded.scale == 1.0


def test_task_vector_patch(tmp_path: Path) -> None:
    base = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4, "b.weight": torch.ones(3)}
    offsets = torch.tensor([[0.5, 0.0, -0.25], [1.0, 2.0, 0.125]])
    ft = {"a.weight": base["a.weight"] + offsets, "b.weight": base["b.weight"].clone()}
    patch = Patch.from_task_vector(ft, base)
    assert patch.kind == "task_vector" and list(patch.deltas) == ["a.weight"]  # zero delta dropped
    assert torch.equal(patch.deltas["a.weight"], offsets)
    assert patch.base_fingerprint == fingerprint(base) and patch.target_modules == ["a"]
    loaded = Patch.load(patch.save(tmp_path / "tv"))
    applied = dict(loaded.apply(base))
    assert all(torch.equal(applied[n], ft[n]) for n in ft)
    half = dict(loaded.apply(base, scale=0.5))
    assert torch.equal(half["a.weight"], base["a.weight"] + offsets / 2)


def test_apply_checks_fingerprint_and_shapes() -> None:
    base = {"w": torch.zeros(2, 2)}
    patch = Patch(kind="dense", deltas={"w": torch.ones(2, 2)}, base_fingerprint=fingerprint(base))
    other = {"w": torch.full((2, 2), 3.0)}
    with pytest.raises(IncompatibleModelsError, match="check_fingerprint=False"):
        patch.apply(other)
    assert torch.equal(dict(patch.apply(other, check_fingerprint=False))["w"], torch.full((2, 2), 4.0))
    with pytest.raises(IncompatibleModelsError, match=r"w \[2, 2\] vs \[3\]"):
        patch.apply({"w": torch.zeros(3)}, check_fingerprint=False)
    with pytest.raises(IncompatibleModelsError, match="not in"):
        patch.apply({"v": torch.zeros(2, 2)}, check_fingerprint=False)


def test_from_lora_checks_base(lora_setup, tmp_path: Path) -> None:
    _, adapter, _ = lora_setup
    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
    ))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(IncompatibleModelsError, match="differ in shape"):
        Patch.from_lora(adapter, base=tmp_path / "small")


def test_from_lora_fingerprint_from_adapter_metadata(lora_setup) -> None:
    _, adapter, _ = lora_setup
    assert Patch.from_lora(adapter).base_fingerprint is None
    weights = adapter / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", FINGERPRINT_METADATA_KEY: "0123abcd"})
    assert Patch.from_lora(adapter).base_fingerprint == "0123abcd"


def test_crash_during_save_leaves_no_folder(monkeypatch, tmp_path: Path) -> None:
    patch = Patch(kind="dense", deltas={"w": torch.ones(3)})

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(patch_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        patch.save(tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_crash_during_overwrite_keeps_the_old_patch(monkeypatch, tmp_path: Path) -> None:
    old = Patch(kind="dense", deltas={"w": torch.ones(3)})
    old.save(tmp_path / "p")
    with pytest.raises(CheckpointError, match="already exists"):
        old.save(tmp_path / "p")
    monkeypatch.setattr(patch_module.json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        Patch(kind="dense", deltas={"w": torch.zeros(3)}).save(tmp_path / "p", overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["p"]
    assert torch.equal(Patch.load(tmp_path / "p").deltas["w"], torch.ones(3))
    Patch(kind="dense", deltas={"w": torch.zeros(3)}).save(tmp_path / "p", overwrite=True)
    assert torch.equal(Patch.load(tmp_path / "p").deltas["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def test_load_validation(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Patch.load(tmp_path / "nope")
    folder = Patch(kind="dense", deltas={"w": torch.ones(3)}).save(tmp_path / "p")
    tensors = (folder / "patch.safetensors").read_bytes()
    meta = (folder / "patch.json").read_text()

    (folder / "patch.json").unlink()
    with pytest.raises(CheckpointError, match="patch.json is missing"):
        Patch.load(folder)
    (folder / "patch.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt patch metadata"):
        Patch.load(folder)
    (folder / "patch.json").write_text(json.dumps(dict(json.loads(meta), format="other")))
    with pytest.raises(CheckpointError, match="not an expertkit patch"):
        Patch.load(folder)
    (folder / "patch.json").write_text(meta)

    (folder / "patch.safetensors").write_bytes(tensors[:-2] + b"\x00\x01")
    with pytest.raises(CheckpointError, match="checksum"):
        Patch.load(folder)
    (folder / "patch.safetensors").unlink()
    with pytest.raises(CheckpointError, match="patch.safetensors is missing"):
        Patch.load(folder)
    (folder / "patch.safetensors").write_bytes(tensors)
    assert torch.equal(Patch.load(folder).deltas["w"], torch.ones(3))
