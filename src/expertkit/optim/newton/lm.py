"""Levenberg-Marquardt damping: λ adapted by the ratio of actual to predicted loss reduction.

A damped Newton step ``x = (G + λI)⁻¹ g``, applied as ``θ ← θ - x``, predicts the reduction of the
local quadratic model ``pred = gᵀx - ½ xᵀGx`` (the damping term is not part of the model). After
the step the loss is measured again and ``ρ = (L(θ) - L(θ - x)) / pred``. Nielsen's rule
(Madsen, Nielsen and Tingleff, *Methods for non-linear least squares problems*, 2004, eq. 3.16):

* ``ρ > eta`` (accepted): ``λ ← λ · max(1/3, 1 - (2ρ - 1)³)``, ``ν ← 2``: a step the model
  predicts well shrinks λ (longer, more Newton-like steps), a poor one keeps it;
* otherwise (rejected, the step is undone): ``λ ← λ ν``, ``ν ← 2ν``.

λ is clamped to ``[lam_min, lam_max]``. A fixed damping cannot do this: too small and the quadratic
model of a cross-entropy far from its optimum sends the step far past where it holds, too large and
every step is a short gradient step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LevenbergMarquardt:
    """The λ of a Levenberg-Marquardt run and its update rule (see the module doc)."""

    lam: float
    nu: float = 2.0
    eta: float = 1e-4
    lam_min: float = 1e-12
    lam_max: float = 1e12

    @staticmethod
    def ratio(loss_before: float, loss_after: float, predicted: float) -> float:
        """``ρ``: actual over predicted reduction (``-inf`` for a non-finite loss or no predicted reduction)."""
        if not math.isfinite(loss_after) or not predicted > 0:
            return -math.inf
        return (loss_before - loss_after) / predicted

    def update(self, rho: float) -> bool:
        """Adapt λ after a trial with ratio ``rho``; returns whether the trial is accepted."""
        if rho > self.eta:
            self.lam *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
            self.nu = 2.0
            accepted = True
        else:
            self.lam *= self.nu
            self.nu *= 2.0
            accepted = False
        self.lam = min(max(self.lam, self.lam_min), self.lam_max)
        return accepted

    def state_dict(self) -> dict[str, float]:
        """λ and ν."""
        return {"lam": self.lam, "nu": self.nu}
