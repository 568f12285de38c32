"""Nearswap: move the base toward the other model where the two are already close.

Semantics, per element (the definition mergekit documents; origin: the QuartetAnemoi-70B-t0.0001
model card, huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): with ``b`` the base and ``m``
the one other model, ``w = clamp(t / |b - m|, 0, 1)`` and ``out = w * m + (1 - w) * b``. Where
``|b - m| <= t`` the model's value is taken; farther apart, the pull fades as ``t / |b - m|``.
Where ``b == m`` the value is that common value (also for ``t = 0``, where mergekit's 0/0 gives
the same). A negative ``t`` keeps the base. ``t`` has no default in mergekit and none here.
Per-model weights play no part. Same as mergekit 0.1.5's ``nearswap``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method


class NearswapParams(MethodParams):
    """Parameters of ``nearswap``."""

    t: float = Field(description="distance below which the model's value is taken (required, as in mergekit)")


@merge_method("nearswap", params=NearswapParams, needs_base=True, min_models=1, max_models=1, uses_weights=False,
              vs_mergekit="equal (1e-6)",
              paper="mergekit's nearswap (alchemonaut, QuartetAnemoi-70B-t0.0001 model card)",
              summary="interpolate base and model element-wise, strongly where they are already close")
def nearswap(x: TensorInputs) -> torch.Tensor:
    """``w m + (1 - w) b`` with ``w = clamp(t / |b - m|, 0, 1)`` (1 where ``b == m``)."""
    b, m = x.work(x.base), x.work(x.tensors[0])
    w = torch.nan_to_num(x.params.t / (b - m).abs(), nan=1.0).clamp_(0, 1)  # (*shape); 0/0 where b == m, t == 0
    return (w * m).add_((1 - w) * b)
