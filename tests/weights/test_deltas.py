"""Task vectors, apply_delta and fingerprints, checked on hand-placed weights."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from expertkit.errors import IncompatibleModelsError, InputTypeError, UnknownNameError
from expertkit.weights.deltas import apply_delta, task_vector
from expertkit.weights.fingerprint import fingerprint, sample_indices, sampled_names
from expertkit.weights.reader import Checkpoint


def hand_placed() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base and known offsets; eighths and sixteenths so every sum is exact in float32."""
    base = {
        "embed.weight": torch.arange(24, dtype=torch.float32).reshape(6, 4) / 8,  # (vocab, hidden)
        "layer.0.weight": -torch.arange(12, dtype=torch.float32).reshape(4, 3) / 8,
        "layer.0.bias": torch.tensor([0.5, -0.25, 1.0, 2.0]),
        "norm.weight": torch.ones(4),
        "position_ids": torch.arange(6, dtype=torch.int64),
    }
    offsets = {
        "embed.weight": (torch.arange(24, dtype=torch.float32).reshape(6, 4) - 12) / 16,
        "layer.0.weight": torch.full((4, 3), 0.0625),
        "layer.0.bias": torch.tensor([1.0, 0.0, -1.0, 0.5]),
        "norm.weight": torch.zeros(4),  # a frozen tensor
    }
    return base, offsets


def finetune(base: dict[str, torch.Tensor], offsets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t + offsets[n] if n in offsets else t.clone() for n, t in base.items()}


def test_task_vector_equals_offsets_exactly(tmp_path: Path) -> None:
    base, offsets = hand_placed()
    save_file(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "ft").mkdir()
    save_file(finetune(base, offsets), str(tmp_path / "ft" / "model.safetensors"))
    got = dict(task_vector(tmp_path / "ft", tmp_path / "base.safetensors"))
    assert set(got) == set(offsets)  # the int64 tensor is skipped
    for name, offset in offsets.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], offset), name


def test_task_vector_from_state_dicts_and_checkpoints(tmp_path: Path) -> None:
    base, offsets = hand_placed()
    save_file(base, str(tmp_path / "base.safetensors"))
    with Checkpoint(tmp_path / "base.safetensors") as ckpt:
        got = dict(task_vector(finetune(base, offsets), ckpt, names=["layer.0.bias"]))
    assert list(got) == ["layer.0.bias"]
    assert torch.equal(got["layer.0.bias"], offsets["layer.0.bias"])


def test_task_vector_bf16_gives_float32_deltas() -> None:
    base = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)}
    ft = {"w": torch.tensor([1.5, 2.0, 2.0], dtype=torch.bfloat16)}
    (name, delta), = task_vector(ft, base)
    assert delta.dtype == torch.float32
    assert torch.equal(delta, torch.tensor([0.5, 0.0, -1.0]))


def test_task_vector_is_lazy_but_checks_first() -> None:
    base, offsets = hand_placed()
    stream = task_vector(finetune(base, offsets), base)
    assert inspect.isgenerator(stream)
    bad = dict(base, **{"layer.0.weight": torch.zeros(3, 4)})
    with pytest.raises(IncompatibleModelsError, match=r"layer\.0\.weight \[3, 4\] vs \[4, 3\]"):
        task_vector(bad, base)  # raised at call time, before any iteration


def test_mismatched_names_listed() -> None:
    base, offsets = hand_placed()
    ft = finetune(base, offsets)
    ft["extra.weight"] = torch.zeros(2)
    del ft["norm.weight"]
    with pytest.raises(IncompatibleModelsError) as info:
        task_vector(ft, base)
    msg = str(info.value)
    assert "only in the fine-tuned model: extra.weight" in msg
    assert "only in the base: norm.weight" in msg
    assert "names=" in msg


def test_integer_tensors_must_be_equal() -> None:
    base, offsets = hand_placed()
    ft = finetune(base, offsets)
    ft["position_ids"] = ft["position_ids"] + 1
    with pytest.raises(IncompatibleModelsError, match="integer/bool tensors differ.*position_ids"):
        task_vector(ft, base)
    got = dict(task_vector(ft, base, names=["layer.0.bias"]))  # excluded: fine
    assert list(got) == ["layer.0.bias"]


def test_unknown_name_and_bad_type() -> None:
    base, offsets = hand_placed()
    with pytest.raises(UnknownNameError, match="layer.0.bais.*Did you mean 'layer.0.bias'"):
        task_vector(base, base, names=["layer.0.bais"])
    with pytest.raises(InputTypeError):
        task_vector(42, base)  # type: ignore[arg-type]


def test_apply_delta() -> None:
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    delta = torch.tensor([[0.5, -0.5], [0.25, 0.0]])
    assert torch.equal(apply_delta(base, delta), torch.tensor([[1.5, 1.5], [3.25, 4.0]]))
    assert torch.equal(apply_delta(base, delta, 2.0), torch.tensor([[2.0, 1.0], [3.5, 4.0]]))
    assert torch.equal(base, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # pure: input untouched
    out = apply_delta(base.to(torch.bfloat16), delta)
    assert out.dtype == torch.bfloat16
    with pytest.raises(IncompatibleModelsError, match=r"\[2\].*\[2, 2\]"):
        apply_delta(base, torch.zeros(2))
    with pytest.raises(InputTypeError):
        apply_delta(torch.zeros(2, dtype=torch.int64), torch.zeros(2))


def test_task_vector_round_trip_with_apply_delta() -> None:
    base, offsets = hand_placed()
    ft = finetune(base, offsets)
    for name, delta in task_vector(ft, base):
        assert torch.equal(apply_delta(base[name], delta), ft[name])


# ------------------------------------------------------------------ fingerprint
def tiny_llama_state() -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
    )
    model = LlamaForCausalLM(cfg)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fingerprint_same_from_dict_folder_file_and_shards(tmp_path: Path) -> None:
    model, state = tiny_llama_state()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    fp = fingerprint(state)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(tmp_path / "one") == fp
    assert fingerprint(str(tmp_path / "one" / "model.safetensors")) == fp
    assert fingerprint(tmp_path / "sharded") == fp
    with Checkpoint(tmp_path / "sharded") as ckpt:
        assert fingerprint(ckpt) == fp


def test_fingerprint_changes_with_a_sampled_weight_name_shape_or_dtype() -> None:
    _, state = tiny_llama_state()
    fp = fingerprint(state)
    name = sampled_names({n: tuple(t.shape) for n, t in state.items()})[3]
    changed = dict(state)
    changed[name] = state[name].clone()
    changed[name].view(-1)[sample_indices(state[name].numel())[5]] += 1e-3
    assert fingerprint(changed) != fp
    assert fingerprint(dict(state, **{name: state[name].to(torch.bfloat16)})) != fp
    renamed = dict(state)
    renamed[name + "_x"] = renamed.pop(name)
    assert fingerprint(renamed) != fp
    assert fingerprint(dict(state, extra=torch.zeros(1))) != fp


def test_fingerprint_samples_only_what_it_documents() -> None:
    state = {f"t{i}": torch.arange(100, dtype=torch.float32) for i in range(3)}
    fp = fingerprint(state)
    idx = set(sample_indices(100))
    assert len(idx) == 64
    unsampled = next(i for i in range(100) if i not in idx)
    changed = dict(state, t1=state["t1"].clone())
    changed["t1"][unsampled] = -1.0
    assert fingerprint(changed) == fp  # a fingerprint is not a checksum


def test_fingerprint_rejects_bad_input() -> None:
    with pytest.raises(InputTypeError):
        fingerprint(3)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError):
        fingerprint({"a": [1, 2]})  # type: ignore[dict-item]
