"""Hyperparameters of the DP optimizers ``dp-sgd`` and ``dp-adamw`` (``optimizer_params``).

The privacy part (ε or σ, δ, clipping norm, accountant) and DP-Flat's three optional parts
(weight perturbation ``rho``, sparse prefix ``prefix_layers``, weight distillation ``teacher`` +
``distill_weight``) sit beside the wrapped optimizer's own settings, so a whole DP run is one
validated config (``expertkit validate`` checks it without loading weights).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from expertkit.config import Config


class DPParams(Config):
    """Differential privacy and DP-Flat settings shared by every DP optimizer."""

    epsilon: float | None = Field(
        8.0, gt=0, description="target epsilon over the whole run (inf = no noise); the noise is calibrated to it"
    )
    noise_multiplier: float | None = Field(
        None, ge=0, description="noise std / clipping norm, instead of a target epsilon (epsilon is then reported)"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of (epsilon, delta)-DP; must be below 1/n")
    max_grad_norm: float = Field(1.0, gt=0, description="per-example gradient clipping norm C")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant: rdp or prv")
    rho: float = Field(
        0.0, ge=0, description="DP-Flat weight perturbation radius (0 = off): ascent along the last privatised gradient"
    )
    prefix_layers: tuple[int, ...] | None = Field(
        None, description="DP-Flat sparse prefix: train only these layers' prefixes (scheme prefix; None = all)"
    )
    teacher: str | None = Field(
        None, description="DP-Flat distillation: output folder of a non-DP teacher trained on public data only"
    )
    distill_weight: float = Field(0.0, ge=0, description="weight of the pull towards the teacher's weights (0 = off)")

    @model_validator(mode="after")
    def _one_noise_source(self) -> DPParams:
        if self.noise_multiplier is not None and "epsilon" in self.model_fields_set and self.epsilon is not None:
            raise ValueError("set either epsilon (a target) or noise_multiplier, not both")
        if self.noise_multiplier is None and self.epsilon is None:
            raise ValueError("set epsilon (a target, inf for no privacy) or noise_multiplier")
        if (self.teacher is None) != (self.distill_weight == 0):
            raise ValueError("distillation needs both teacher (a folder) and distill_weight > 0")
        if self.prefix_layers is not None and (not self.prefix_layers or min(self.prefix_layers) < 0):
            raise ValueError("prefix_layers must be a non-empty list of layer indices >= 0")
        return self


class DPSGDParams(DPParams):
    """``dp-sgd``: DP settings plus SGD's."""

    momentum: float = Field(0.0, ge=0, lt=1, description="momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")


class DPAdamWParams(DPParams):
    """``dp-adamw``: DP settings plus AdamW's."""

    betas: tuple[float, float] = Field((0.9, 0.999), description="moment decay rates")
    eps: float = Field(1e-8, gt=0, description="AdamW denominator epsilon (not the privacy epsilon)")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
