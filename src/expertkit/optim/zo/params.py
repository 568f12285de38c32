"""Hyperparameters shared by every zeroth-order method (each method may add its own)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from expertkit.config import Config


class ZOParams(Config):
    """Estimator, block-wise descent, gradient sparsity and hybrid ZO/FO settings."""

    eps: float = Field(1e-3, gt=0, description="perturbation scale ε (MeZO/ZO-Bench: 1e-3 full, 1e-2 LoRA, 1e-1 prefix)")
    q: int = Field(1, ge=1, description="random directions per step (averaged; replayed from seeds, no extra memory)")
    estimator: Literal["two-sided", "one-sided"] = Field(
        "two-sided", description="two-sided: (L(θ+εz)-L(θ-εz))/2ε; one-sided: (L(θ+εz)-L(θ))/ε"
    )
    exact_restore: bool = Field(
        True, description="record the coordinates in-place undo cannot restore, so θ comes back bit-identical"
    )
    block: Literal["none", "layer", "attn-mlp", "linear"] = Field(
        "none", description="block-wise ZO: one estimate and update per transformer block, attention/MLP or linear"
    )
    sparsity: float = Field(0.0, ge=0, lt=1, description="fraction of coordinates NOT perturbed (1 - density)")
    sparsity_scope: Literal["layer", "global"] = Field(
        "layer", description="choose the perturbed coordinates per tensor, or with one threshold over all"
    )
    sparsity_by: Literal["magnitude", "random"] = Field(
        "magnitude", description="magnitude: perturb the smallest-|θ| coordinates (Sparse MeZO); random: uniform"
    )
    mask_every: int = Field(50, ge=1, description="resample the sparsity mask every this many steps")
    fo_modules: tuple[str, ...] = Field(
        (), description="hybrid ZO/FO: parameters whose name contains one of these are trained with back-propagation"
    )
    fo_lr: float = Field(1e-3, gt=0, description="learning rate of the back-propagated (hybrid) parameters")
    fo_optimizer: Literal["sgd", "adam"] = Field("adam", description="optimizer of the hybrid FO parameters")
