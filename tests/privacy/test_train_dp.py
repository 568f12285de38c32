"""``train_lora`` with a DP optimizer: the adapter trains (Opacus issue 820), ε is reported, runs resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from expertkit.models.loader import LoadedModel
from expertkit.models.tiny import tiny_model, tiny_tokenizer
from expertkit.privacy.accounting import epsilon_spent
from expertkit.tasks.toy import lohi_task
from tests.train.conftest import _interrupt_at

TASK = lohi_task()
FAST = {"batch_size": 8, "train_examples": 64, "rank": 2, "target_modules": ("q_proj", "v_proj"), "lr": 1e-2,
        "optimizer": "dp-adamw"}


def loaded() -> LoadedModel:
    return LoadedModel("tiny", tiny_model("llama", seed=0), tiny_tokenizer(), None, None)


def test_lora_weights_change_and_the_privacy_spent_is_recorded(tmp_path):
    # a given noise multiplier (calibrating to a target epsilon is tested in test_accounting: it takes seconds)
    res = train_lora_dp(tmp_path / "a", steps=4, save_every=0, optimizer_params={"noise_multiplier": 0.7, "delta": 1e-3})
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = [t for k, t in tensors.items() if "lora_B" in k]
    assert len(b) == 4 and all(t.abs().max() > 1e-4 for t in b)  # B starts at exactly zero
    rep = res.meta["optimizer_report"]
    assert rep["steps"] == 4 and rep["sample_rate"] == 8 / 64 and rep["private_examples"] == 64
    assert rep["noise_multiplier"] == 0.7 and rep["target_epsilon"] is None
    assert rep["epsilon"] == epsilon_spent(0.7, 8 / 64, 4, 1e-3)


def train_lora_dp(out, **kw):
    from expertkit.train import train_lora

    return train_lora(loaded(), TASK, out, **{**FAST, **kw})


def test_a_resumed_dp_flat_run_ends_where_an_uninterrupted_one_does(tmp_path):
    params = {"noise_multiplier": 0.7, "delta": 1e-3, "rho": 0.05}
    train_lora_dp(tmp_path / "whole", steps=4, save_every=2, optimizer_params=params)
    with pytest.raises(KeyboardInterrupt):
        train_lora_dp(tmp_path / "cut", steps=4, save_every=2, optimizer_params=params, callbacks=[_interrupt_at(3)])
    res = train_lora_dp(tmp_path / "cut", steps=4, save_every=2, optimizer_params=params)
    assert res.resumed_from == 2
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert res.meta["optimizer_report"]["steps"] == 4  # the accountant's history was resumed too


def test_dp_needs_a_first_order_trainable_model_and_valid_params(tmp_path):
    from expertkit.errors import ConfigError

    with pytest.raises(ConfigError, match="set either epsilon"):
        train_lora_dp(tmp_path / "x", steps=1, optimizer_params={"epsilon": 3.0, "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match=r"delta 0.1 must be in \(0, 1/n\)"):
        train_lora_dp(tmp_path / "x", steps=1, optimizer_params={"delta": 0.1})
