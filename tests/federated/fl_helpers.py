"""Helpers of the federated tests."""

from __future__ import annotations

from expertkit.federated.config import FlConfig


def tiny_fl(**overrides) -> FlConfig:
    """A 3-client, 2-round inline run of a tiny llama on the toy lo/hi task (about a second)."""
    base = dict(model="tiny:llama", task="toy:lohi", clients=3, rounds=2, examples_per_client=16, local_steps=2,
                batch_size=4, lr=1e-2, eval_n=0, engine="inline", target_modules=("q_proj", "v_proj"))
    base.update(overrides)
    return FlConfig.model_validate(base)
