"""ZO-SGD-Scalar-Sign: ``θ -= lr * sign(g) z``, the sign of the scalar projected gradient.

This is what ZO-Bench's released code runs under the name ZO-SGD-Sign: only the scalar
``g = (L+ - L-) / 2ε`` is replaced by its sign, so the step is still along ``z`` (not an
element-wise sign step; see ``zo-sgd-sign`` for that).
"""

from __future__ import annotations

import math

from expertkit.optim.zo.base import ZOMethod, register


@register("zo-sgd-scalar-sign", summary="ZO-SGD with the sign of the scalar projected gradient (ZO-Bench's code)",
          paper="Zhang et al., Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark (ICML 2024)")
class ZOSGDScalarSign(ZOMethod):
    """Direction weights ``sign(g_j) / q``."""

    def coefficients(self, grads: list[float]) -> list[float]:
        """``sign(g_j) / q`` (0 stays 0)."""
        return [(0.0 if g == 0 else math.copysign(1.0, g)) / len(grads) for g in grads]
