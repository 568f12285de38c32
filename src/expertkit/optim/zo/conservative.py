"""ZO-SGD-Cons: conservative ZO-SGD, keep the best of ``θ``, ``θ - step`` and ``θ + step``.

Two extra forwards per block (three with the two-sided estimator, which does not give
``L(θ)``); candidates are tried in place and undone exactly.
"""

from __future__ import annotations

from expertkit.optim.zo.base import Loss, ZOMethod, register


@register("zo-sgd-cons", summary="conservative ZO-SGD: keep the best of θ, θ - step, θ + step", paper="Zhang et al., Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark (ICML 2024)")
class ZOSGDConservative(ZOMethod):
    """Only moves when a candidate step lowers the batch loss."""

    def update(self, ids: list[int], seeds: list[int], grads: list[float], lr: float, loss: Loss) -> None:
        """Try ``θ - lr ĝ`` and ``θ + lr ĝ``; keep whichever of the three has the lowest loss."""
        if lr == 0:
            return
        eng = self.engine
        down = [-lr * c for c in self.coefficients(grads)]
        up = [-c for c in down]
        base = loss()
        patches = eng.add(ids, seeds, down, record=True)
        l_down = loss()
        eng.undo(ids, seeds, down, patches)
        patches = eng.add(ids, seeds, up, record=True)
        l_up = loss()
        best = min((base, 0), (l_down, 1), (l_up, 2))[1]
        if best != 2:
            eng.undo(ids, seeds, up, patches)
        if best == 1:
            eng.add(ids, seeds, down)
