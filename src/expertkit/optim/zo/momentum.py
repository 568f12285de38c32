"""ZO-SGD-MMT: heavy-ball momentum on the ZO estimate, ``m = β m + ĝ; θ -= lr * m``.

The momentum buffer is dense: it costs one copy of the trainable parameters.
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.optim.zo.base import ZOMethod, register
from expertkit.optim.zo.params import ZOParams


class MomentumParams(ZOParams):
    """ZO parameters plus the momentum factor."""

    momentum: float = Field(0.9, ge=0, lt=1, description="momentum factor β")


@register("zo-sgd-mmt", summary="ZO-SGD with momentum (one dense buffer)", paper="Zhang et al., Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark (ICML 2024)")
class ZOSGDMomentum(ZOMethod):
    """Momentum SGD on the zeroth-order estimate."""

    params_model = MomentumParams

    def transform(self, i: int, ghat: torch.Tensor, lr: float) -> torch.Tensor:
        """``m_i = β m_i + ĝ_i``; change ``-lr * m_i``."""
        buf = self.state.setdefault("m", {})
        if i not in buf:
            buf[i] = ghat.clone()
        else:
            buf[i].mul_(self.hp.momentum).add_(ghat)
        return buf[i] * -lr
