"""LoRA expert training on tiny models: learning, seeding, resuming, atomic output, optimizer plug-ins."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from expertkit.errors import CheckpointError, ConfigError, UnknownNameError
from expertkit.models.loader import LoadedModel
from expertkit.models.tiny import tiny_model, tiny_tokenizer
from expertkit.tasks.base import Example
from expertkit.tasks.evaluate import evaluate
from expertkit.tasks.toy import copy_task, lohi_task
from expertkit.train import OPTIMIZERS, LoraTrainConfig, build_optimizer, train_lora
from expertkit.train.data import IGNORE, batch_indices, collate, encode_examples
from expertkit.train.optimizers import OptimizerSetup
from expertkit.train.state import flatten_state, unflatten_state
from expertkit.weights.fingerprint import FINGERPRINT_METADATA_KEY

COPY = copy_task()
CLASSIFY = lohi_task()
FAST = {"batch_size": 4, "rank": 4, "target_modules": ("q_proj", "v_proj"), "save_every": 0}


@pytest.fixture
def loaded() -> LoadedModel:
    """A fresh tiny llama with the character tokenizer (training wraps it in place)."""
    return LoadedModel("tiny", tiny_model("llama", seed=0), tiny_tokenizer(), None, None)


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ learning
def test_learns_copy_task_to_full_accuracy(loaded, tmp_path) -> None:
    base = evaluate(loaded, None, COPY, n=50)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    res = train_lora(
        loaded, COPY, tmp_path / "copy", steps=80, lr=1e-2, rank=8, batch_size=16,
        target_modules=("q_proj", "v_proj", "lm_head"), eval_n=50,
    )
    assert base.accuracy < 0.2
    assert res.metrics["accuracy"] == 1.0 and res.metrics["n"] == 50
    assert res.losses[-1] < 0.3 < 3.0 < res.losses[0]
    # measured again from the saved adapter: the folder is a working PEFT adapter
    assert evaluate(loaded, None, COPY, n=50, adapter=tmp_path / "copy").accuracy == 1.0
    # the base model is given back unchanged, without LoRA layers
    assert_same_tensors(before, dict(loaded.model.state_dict()))
    assert not any("lora" in n for n, _ in loaded.model.named_modules())


def test_learns_choice_task_to_full_accuracy(loaded, tmp_path) -> None:
    res = train_lora(
        loaded, CLASSIFY, tmp_path / "cls", steps=30, lr=1e-2, rank=8, batch_size=16,
        target_modules=("q_proj", "v_proj", "lm_head"),
    )
    assert evaluate(loaded, None, CLASSIFY, n=50, adapter=res.out_dir).accuracy == 1.0


def test_output_folder_contents(loaded, tmp_path) -> None:
    out = tmp_path / "ad"
    res = train_lora(loaded, CLASSIFY, out, steps=3, lr=1e-3, **FAST)
    assert sorted(p.name for p in out.iterdir() if p.name != "README.md") == [
        "adapter_config.json", "adapter_model.safetensors", "expertkit.json",
    ]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    meta = json.loads((out / "expertkit.json").read_text())
    assert meta["task"] == "lo-hi" and meta["steps"] == 3 and meta["seed"] == 0 and meta["lr"] == 1e-3
    assert meta["losses"] == res.losses and meta["final_loss"] == res.final_loss and meta["metrics"] is None
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        assert fh.metadata()[FINGERPRINT_METADATA_KEY] == meta["base_fingerprint"]
    assert not list(tmp_path.glob(".ad*"))  # no temporary folders left behind


# ------------------------------------------------------------------ seeding and resuming
def test_same_seed_same_adapter(tmp_path) -> None:
    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        lm = LoadedModel("tiny", tiny_model("llama", seed=0), tiny_tokenizer(), None, None)
        train_lora(lm, CLASSIFY, tmp_path / name, steps=4, lr=1e-2, seed=seed, dropout=0.1, **FAST)
        return adapter_tensors(tmp_path / name)

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert_same_tensors(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_caller_rng_untouched(loaded, tmp_path) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    train_lora(loaded, CLASSIFY, tmp_path / "a", steps=2, **FAST)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("optimizer,params", [("adamw", {"weight_decay": 0.01}), ("sgd", {"momentum": 0.9})])
def test_resume_after_interrupt_gives_identical_adapter(tmp_path, optimizer: str, params: dict[str, Any],
                                                      interrupt_at) -> None:
    def fresh() -> LoadedModel:
        return LoadedModel("tiny", tiny_model("llama", seed=0), tiny_tokenizer(), None, None)

    cfg = LoraTrainConfig(
        steps=8, lr=1e-2, batch_size=4, rank=4, dropout=0.1, save_every=3, optimizer=optimizer,
        optimizer_params=params, schedule="linear", warmup_steps=2, train_examples=10,
    )
    full = train_lora(fresh(), CLASSIFY, tmp_path / "full", cfg)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_lora(fresh(), CLASSIFY, out, cfg, callbacks=[interrupt_at(5)])
    assert (out / "checkpoint" / "state.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # no half-written adapter
    res = train_lora(fresh(), CLASSIFY, out, cfg)
    assert res.resumed_from == 3 and full.resumed_from is None
    assert res.losses == full.losses
    assert_same_tensors(adapter_tensors(tmp_path / "full"), adapter_tensors(out))
    assert not (out / "checkpoint").exists()


def test_callback_time_is_not_training_time(loaded, tmp_path, monkeypatch) -> None:
    """``seconds`` counts the steps, not what callbacks do between them (a validation, a snapshot): on a fake
    clock that a callback moves by 100 s per step, the reported training time stays under 100 s."""
    import expertkit.train.lora as lora

    clock = [0.0]

    def perf_counter() -> float:
        clock[0] += 0.5  # every reading of the clock: half a second of "training"
        return clock[0]

    def slow(info) -> None:
        seen.append(info.seconds)
        clock[0] += 100.0  # a long callback

    seen: list[float] = []
    monkeypatch.setattr(lora.time, "perf_counter", perf_counter)
    res = train_lora(loaded, CLASSIFY, tmp_path / "a", steps=3, **FAST, callbacks=[slow])
    assert len(seen) == 3 and seen == sorted(seen)
    assert res.seconds < 100.0 and seen[-1] < 100.0  # without the exclusion: over 200 s
    assert clock[0] > 300.0  # the callbacks did move the clock


def test_finished_adapter_is_reused(loaded, tmp_path, monkeypatch) -> None:
    first = train_lora(loaded, CLASSIFY, tmp_path / "a", steps=2, **FAST)

    def boom(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(loaded.model, "forward", boom)
    again = train_lora(loaded, CLASSIFY, tmp_path / "a", steps=2, **FAST)
    assert again.reused and again.losses == first.losses
    monkeypatch.undo()
    other = train_lora(loaded, CLASSIFY, tmp_path / "a", steps=3, **FAST)  # another config: retrained
    assert not other.reused and len(other.losses) == 3


def test_a_finished_adapter_is_not_reused_on_a_base_changed_in_unsampled_tensors(tmp_path) -> None:
    from expertkit.weights.fingerprint import fingerprint, sampled_names

    model = tiny_model("llama", seed=0)
    lm = LoadedModel("tiny", model, tiny_tokenizer(), None, fingerprint(model.state_dict()))
    train_lora(lm, CLASSIFY, tmp_path / "a", steps=2, **FAST)
    state = model.state_dict()
    name = next(n for n in sorted(state) if n not in sampled_names({k: tuple(v.shape) for k, v in state.items()}))
    with torch.no_grad():
        model.get_parameter(name).mul_(2.0)
    edited = LoadedModel("tiny", model, tiny_tokenizer(), None, fingerprint(model.state_dict()))
    assert edited.fingerprint == lm.fingerprint  # the sampled fingerprint cannot tell them apart
    assert not train_lora(edited, CLASSIFY, tmp_path / "a", steps=2, **FAST).reused


def test_resume_with_other_config_is_refused(tmp_path, interrupt_at) -> None:
    lm = LoadedModel("tiny", tiny_model("llama", seed=0), tiny_tokenizer(), None, None)
    cfg = LoraTrainConfig(steps=4, save_every=2, **{k: v for k, v in FAST.items() if k != "save_every"})
    with pytest.raises(KeyboardInterrupt):
        train_lora(lm, CLASSIFY, tmp_path / "a", cfg, callbacks=[interrupt_at(3)])
    with pytest.raises(CheckpointError, match="resume=False"):
        train_lora(lm, CLASSIFY, tmp_path / "a", cfg, lr=5e-3)
    res = train_lora(lm, CLASSIFY, tmp_path / "a", cfg, lr=5e-3, resume=False)
    assert res.resumed_from is None and len(res.losses) == 4


# ------------------------------------------------------------------ errors
def test_unknown_optimizer_suggests(loaded, tmp_path) -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'adamw'"):
        train_lora(loaded, CLASSIFY, tmp_path / "a", steps=1, optimizer="adamx")
    assert not (tmp_path / "a").exists()


def test_config_errors(loaded, tmp_path) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'steps'"):
        train_lora(loaded, CLASSIFY, tmp_path / "a", stpes=3)
    with pytest.raises(ConfigError, match="momentum"):
        train_lora(loaded, CLASSIFY, tmp_path / "a", steps=1, optimizer="sgd", optimizer_params={"momentun": 0.9})
    with pytest.raises(ConfigError, match="match no layer"):
        train_lora(loaded, CLASSIFY, tmp_path / "a", steps=1, target_modules=("qq_proj",))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        train_lora(loaded, CLASSIFY, tmp_path / "b", steps=1)


# ------------------------------------------------------------------ optimizer plug-ins
class SignSGD:
    """A step-function optimizer written against the protocol only (no torch.optim)."""

    def __init__(self, params: list[torch.nn.Parameter], setup: OptimizerSetup) -> None:
        self.params, self.calls = params, 0

    def step(self, loss_fn, lr: float) -> float:
        for p in self.params:
            p.grad = None
        loss = loss_fn().mean()
        loss.backward()
        with torch.no_grad():
            for p in self.params:
                p -= lr * p.grad.sign()
        self.calls += 1
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]


def test_registered_optimizer_plugs_in(monkeypatch, loaded, tmp_path) -> None:
    monkeypatch.setitem(OPTIMIZERS._entries, "signsgd", OPTIMIZERS._entries["sgd"].__class__("signsgd", SignSGD))
    res = train_lora(loaded, CLASSIFY, tmp_path / "a", steps=6, lr=1e-2, optimizer="signsgd", **FAST)
    assert res.losses[-1] < res.losses[0]
    opt = build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], lr=0.1, steps=1, seed=0)
    assert opt.step(lambda: (opt.params[0] - torch.tensor([1.0, -1.0])).pow(2), 0.1) == pytest.approx(1.0)


# ------------------------------------------------------------------ data and state helpers
def test_labels_mask_prompt_and_padding() -> None:
    tok = tiny_tokenizer()
    rows = encode_examples(tok, COPY, [Example("ab:", "a"), Example("x:", "x")], 64)
    assert rows[0] == (tok("ab:").input_ids, tok(" a", add_special_tokens=False).input_ids + [tok.eos_token_id])
    ids, mask, labels = collate(rows, 0)
    assert labels[0].tolist() == [IGNORE] * 3 + rows[0][1]
    assert labels[1].tolist() == [IGNORE] * 2 + rows[1][1] + [IGNORE]
    assert mask[1].tolist() == [1] * 5 + [0]


def test_batch_order_covers_each_epoch() -> None:
    order = [i for s in range(5) for i in batch_indices(s, 4, 10, seed=7)]  # 20 = two epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert order != [i for s in range(5) for i in batch_indices(s, 4, 10, seed=8)]


def test_state_round_trip() -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}},
        "groups": [{"betas": (0.9, 0.99), "x": None}],
    }
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.loads(json.dumps(flatten_state(state, "o", tensors)))
    back = unflatten_state(skeleton, tensors)
    assert list(back["state"]) == [0] and back["groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(back["state"][0]["m"], torch.ones(2))


def test_lr_schedule() -> None:
    cfg = LoraTrainConfig(steps=10, lr=1.0, warmup_steps=2, schedule="linear")
    assert [round(cfg.lr_at(s), 3) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]
    assert LoraTrainConfig(lr=0.3).lr_at(5) == 0.3
