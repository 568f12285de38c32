"""ZO-SGD (MeZO): ``θ -= lr * ĝ`` with ``ĝ = mean_j g_j z_j``, directions replayed from seeds."""

from __future__ import annotations

from expertkit.optim.zo.base import ZOMethod, register


@register("zo-sgd", summary="ZO-SGD (MeZO): two forwards per step, inference memory",
          paper="Malladi et al., Fine-Tuning Language Models with Just Forward Passes (NeurIPS 2023)")
class ZOSGD(ZOMethod):
    """Zeroth-order SGD: the base rule, unchanged."""
