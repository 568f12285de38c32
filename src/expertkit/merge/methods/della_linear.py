"""DELLA without sign election: MagPrune drop and rescale, then task arithmetic.

Semantics: the task vectors are dropped and rescaled exactly as in :mod:`~expertkit.merge.methods.della`
(magnitude-ranked keep probabilities ``density +/- epsilon`` within each row), then
``base + lambda * sum_i w_i d_i'``, divided by ``sum_i w_i`` when ``normalize`` (off by default,
as in mergekit). Paper: Deep et al. 2024, DELLA-Merging (arXiv:2406.11617). The difference from
mergekit 0.1.5 is della's: other random draws, and per-entry instead of per-tensor rescaling.
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import TensorInputs, if_normalize, merge_method, weighted_sum
from expertkit.merge.methods.della import DellaParams, magprune


class DellaLinearParams(DellaParams):
    """Parameters of ``della_linear``."""

    normalize: bool = Field(False, description="divide the sum by the sum of the weights")


@merge_method("della_linear", params=DellaLinearParams, needs_base=True, per_model=("density", "epsilon"),
              normaliser=if_normalize("total"),
              vs_mergekit="as della: same keep probabilities, other draws, per-entry rescale; keep rates and "
                          "regression slope tested",
              paper="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
              summary="drop task-vector entries with magnitude-ranked probabilities, rescale, add")
def della_linear(x: TensorInputs) -> torch.Tensor:
    """``base + lambda * sum_i w_i magprune(d_i)``."""
    mixed = weighted_sum(magprune(x), x.weights, x.params.normalize, inplace=True)
    return mixed.mul_(x.params.lambda_).add_(x.base.to(x.work_dtype))
