"""TIES-merging: trim, elect sign, disjoint merge.

Semantics, per tensor (the paper's, with per-model weights as in mergekit):

1. *Trim*: each task vector ``d_i = theta_i - base`` keeps its ``k = max(1, int(density * numel))``
   largest magnitudes **within this tensor** (per-tensor top-k, not global over the model);
   the rest are set to 0. Elements tied with the k-th magnitude are all kept.
2. *Elect*: the sign of ``sum_i w_i d_i`` (the summed mass; +1 where the sum is exactly 0).
3. *Disjoint merge*: ``sum_i w_i d_i`` over the models whose ``w_i d_i`` has the elected sign,
   divided by the sum of those models' weights when ``normalize`` (default; a zero divisor
   counts as 1), times ``lambda``, added to the base.

With ``rescale`` (mergekit's option, off by default) each trimmed task vector is multiplied by
``|d_i|_1 / |trim(d_i)|_1`` before the election, so trimming keeps its L1 norm.

Differences from mergekit 0.1.5 ``ties``: mergekit picks exactly k elements with an argsort
(ties at the threshold broken by sort order) where expertkit keeps every tied element and uses
a k-th-value selection (faster, no sort). The defaults are mergekit's: ``density`` 1.0 (no
trimming; the paper's experiments use 0.2), ``normalize`` on, ``lambda`` 1.
"""

from __future__ import annotations

import torch
from pydantic import AliasChoices, Field

from expertkit.merge.methods.base import (
    MethodParams,
    TensorInputs,
    elect_and_mean,
    if_normalize,
    l1_rescale_,
    merge_method,
    trim_,
)


class TiesParams(MethodParams):
    """Parameters of ``ties``."""

    density: float = Field(1.0, ge=0.0, le=1.0, description="fraction of each task vector kept (per tensor, by magnitude)")
    lambda_: float = Field(1.0, validation_alias=AliasChoices("lambda", "scaling", "lambda_"),
                           serialization_alias="lambda", description="scale of the merged task vector")
    normalize: bool = Field(True, description="disjoint mean (divide by the agreeing models' weights)")
    rescale: bool = Field(False, description="scale each trimmed task vector back to its L1 norm before trimming")


@merge_method("ties", params=TiesParams, needs_base=True, per_model=("density",), normaliser=if_normalize("subsets"),
              vs_mergekit="equal (1e-6); elements tied with the k-th magnitude are all kept (mergekit: sort order)",
              paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
              summary="trim to top-k magnitude, elect sign by summed mass, disjoint mean")
def ties(x: TensorInputs) -> torch.Tensor:
    """Trim each task vector to its per-tensor top-k, elect signs, average the agreeing entries."""
    deltas = x.deltas()
    for d, p in zip(deltas, x.per_model, strict=True):
        l1 = float(d.abs().sum()) if x.params.rescale else 0.0
        trim_(d, p.density)
        if x.params.rescale:
            l1_rescale_(d, l1)
    mixed = elect_and_mean(deltas, x.weights, x.params.normalize)
    return mixed.mul_(x.params.lambda_).add_(x.base.to(x.work_dtype))
