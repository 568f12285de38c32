"""ZO-Adam: Adam's moments on the ZO gradient estimate (two dense buffers)."""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.optim.zo.base import ZOMethod, register
from expertkit.optim.zo.params import ZOParams


class ZOAdamParams(ZOParams):
    """ZO parameters plus Adam's."""

    betas: tuple[float, float] = Field((0.9, 0.999), description="moment decay rates")
    adam_eps: float = Field(1e-8, gt=0, description="denominator epsilon")


@register("zo-adam", summary="ZO-Adam: Adam on the ZO estimate (two dense buffers)", paper="Zhang et al., Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark (ICML 2024)")
class ZOAdam(ZOMethod):
    """Adam with bias correction; the step count is the ZO step."""

    params_model = ZOAdamParams

    def transform(self, i: int, ghat: torch.Tensor, lr: float) -> torch.Tensor:
        """``-lr * m̂ / (sqrt(v̂) + eps)``."""
        b1, b2 = self.hp.betas
        m = self.state.setdefault("m", {})
        v = self.state.setdefault("v", {})
        if i not in m:
            m[i], v[i] = torch.zeros_like(ghat), torch.zeros_like(ghat)
        m[i].mul_(b1).add_(ghat, alpha=1 - b1)
        v[i].mul_(b2).addcmul_(ghat, ghat, value=1 - b2)
        t = self.t + 1
        denom = (v[i] / (1 - b2**t)).sqrt_().add_(self.hp.adam_eps)
        return (m[i] / (1 - b1**t)).div_(denom).mul_(-lr)
