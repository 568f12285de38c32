"""Model Breadcrumbs: drop both the smallest and the largest task-vector entries, then add.

Semantics, per tensor: for each task vector ``d_i`` (``n`` elements) sorted by magnitude,
the largest ``int(gamma * n)`` (outliers) and the smallest ``max(0, n - int(density * n) -
int(gamma * n))`` are set to 0, so ``int(density * n)`` elements survive (fewer outliers are
removed when ``density + gamma > 1``). The result is ``base + lambda * sum_i w_i d_i'``
(divided by ``sum_i w_i`` when ``normalize``); with ``rescale`` each masked task vector is first
multiplied by ``|d_i|_1 / |d_i'|_1`` (mergekit's option). Ties in magnitude are broken by a stable sort
(lower index counts as smaller). Same selection rule as mergekit's ``breadcrumbs``
(``magnitude_outliers``), with mergekit's defaults (density 1.0: nothing dropped; gamma 0.01).
"""

from __future__ import annotations

import torch
from pydantic import AliasChoices, Field

from expertkit.merge.methods.base import (
    MethodParams,
    TensorInputs,
    if_normalize,
    l1_rescale_,
    merge_method,
    weighted_sum,
)


class BreadcrumbsParams(MethodParams):
    """Parameters of ``breadcrumbs``."""

    density: float = Field(1.0, ge=0.0, le=1.0, description="fraction of each task vector kept")
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="fraction of largest-magnitude entries removed")
    lambda_: float = Field(1.0, validation_alias=AliasChoices("lambda", "scaling", "lambda_"),
                           serialization_alias="lambda", description="scale of the merged task vector")
    normalize: bool = Field(False, description="divide the sum by the sum of the weights")
    rescale: bool = Field(False, description="scale each masked task vector back to its L1 norm before masking")


def breadcrumb_mask(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Bool mask keeping the middle band of magnitudes (see the module docstring)."""
    n = d.numel()
    if density >= 1:
        return torch.ones_like(d, dtype=torch.bool)
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    order = torch.sort(d.abs().reshape(-1), stable=True).indices  # ascending magnitude
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot:n_bot + keep]] = True
    return mask.reshape(d.shape)


@merge_method("breadcrumbs", params=BreadcrumbsParams, needs_base=True, per_model=("density", "gamma"),
              normaliser=if_normalize("total"), vs_mergekit="equal (1e-6)",
              paper="Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)",
              summary="drop the smallest and the largest task-vector entries, then add")
def breadcrumbs(x: TensorInputs) -> torch.Tensor:
    """``base + lambda * sum_i w_i mask_i * d_i`` with the breadcrumb masks."""
    mixed = weighted_sum(breadcrumb_deltas(x), x.weights, x.params.normalize, inplace=True)
    return mixed.mul_(x.params.lambda_).add_(x.base.to(x.work_dtype))


def breadcrumb_deltas(x: TensorInputs) -> list[torch.Tensor]:
    """The task vectors with the breadcrumb masks applied (and L1-rescaled with ``rescale``)."""
    deltas = x.deltas()
    for d, p in zip(deltas, x.per_model, strict=True):
        l1 = float(d.abs().sum()) if x.params.rescale else 0.0
        d.mul_(breadcrumb_mask(d, p.density, p.gamma))
        if x.params.rescale:
            l1_rescale_(d, l1)
    return deltas
