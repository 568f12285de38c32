"""Model Breadcrumbs with TIES' sign election: breadcrumb masks, then elect and (disjoint) merge.

Semantics, per tensor: each task vector ``d_i = theta_i - base`` keeps the middle band of its
magnitudes exactly as ``breadcrumbs`` does (the largest ``int(gamma * n)`` and the smallest
``n - int(density * n) - int(gamma * n)`` are zeroed; see :mod:`~expertkit.merge.methods.breadcrumbs`),
optionally rescaled to its L1 norm (``rescale``); then TIES' sign election over ``sum_i w_i d_i'``
and the sum of the agreeing ``w_i d_i'``, divided by the agreeing weights when ``normalize``
(off by default, as in mergekit), times ``lambda``, added to the base.

Paper: Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795), with the sign election of
Yadav et al. 2023, TIES-Merging (arXiv:2306.01708); mergekit documents the combination as
``breadcrumbs_ties``. Same parameters and defaults as mergekit 0.1.5.
"""

from __future__ import annotations

import torch

from expertkit.merge.methods.base import TensorInputs, elect_and_mean, if_normalize, merge_method
from expertkit.merge.methods.breadcrumbs import BreadcrumbsParams, breadcrumb_deltas


class BreadcrumbsTiesParams(BreadcrumbsParams):
    """Parameters of ``breadcrumbs_ties`` (those of ``breadcrumbs``)."""


@merge_method("breadcrumbs_ties", params=BreadcrumbsTiesParams, needs_base=True, per_model=("density", "gamma"),
              normaliser=if_normalize("subsets"), vs_mergekit="equal (1e-6)",
              paper="Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795) with TIES sign election",
              summary="breadcrumb masks, then TIES sign election and (disjoint) sum")
def breadcrumbs_ties(x: TensorInputs) -> torch.Tensor:
    """``base + lambda * elect_and_mean(breadcrumb-masked task vectors)``."""
    mixed = elect_and_mean(breadcrumb_deltas(x), x.weights, x.params.normalize)
    return mixed.mul_(x.params.lambda_).add_(x.base.to(x.work_dtype))
