"""ZO-SGD-Sign: ``θ -= lr * sign(ĝ)``, the element-wise sign of the gradient estimate."""

from __future__ import annotations

import torch

from expertkit.optim.zo.base import ZOMethod, register


@register("zo-sgd-sign", summary="ZO-SGD-Sign: element-wise sign of the ZO gradient estimate",
          paper="Zhang et al., Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark (ICML 2024)")
class ZOSGDSign(ZOMethod):
    """Sign descent on the estimate: every coordinate moves by exactly ``lr``."""

    def transform(self, i: int, ghat: torch.Tensor, lr: float) -> torch.Tensor:
        """``-lr * sign(ĝ)``."""
        return ghat.sign_().mul_(-lr)
