"""DARE (drop and rescale), in a linear and a TIES variant.

Semantics, per tensor: each task vector ``d_i = theta_i - base`` has every element dropped
independently with probability ``p = 1 - density`` and the survivors multiplied by
``1 / (1 - p) = 1 / density`` (when ``rescale``, the default), so the expected task vector is
unchanged. The random mask comes from a generator seeded by the merge ``seed`` and the tensor
name (any tensor order gives the same masks).

* ``dare_linear``: ``base + lambda * sum_i w_i d_i'`` (divided by ``sum_i w_i`` when ``normalize``).
* ``dare_ties``: the dropped-and-rescaled ``d_i'`` then go through TIES' sign election and
  disjoint mean (:mod:`~expertkit.merge.methods.ties`).

Differences from mergekit 0.1.5: mergekit rescales the survivors so that the tensor's **L1
norm** matches the undropped one (``|d|_1 / |d'|_1``, a data-dependent factor close to
``1/density``) instead of the paper's ``1/(1-p)``; it draws the mask with the global torch RNG;
the defaults are mergekit's (``density`` 1.0: nothing dropped; ``rescale`` on; ``normalize`` off
for both variants).
"""

from __future__ import annotations

import torch
from pydantic import AliasChoices, Field

from expertkit.merge.methods.base import (
    MethodParams,
    TensorInputs,
    bernoulli_keep,
    elect_and_mean,
    if_normalize,
    merge_method,
    weighted_sum,
)


class DareParams(MethodParams):
    """Parameters of ``dare_linear``."""

    density: float = Field(1.0, gt=0.0, le=1.0, description="keep probability 1 - p of each task-vector element")
    rescale: bool = Field(True, description="multiply kept elements by 1 / density")
    lambda_: float = Field(1.0, validation_alias=AliasChoices("lambda", "scaling", "lambda_"),
                           serialization_alias="lambda", description="scale of the merged task vector")
    normalize: bool = Field(False, description="divide the sum by the sum of the weights")


class DareTiesParams(DareParams):
    """Parameters of ``dare_ties``."""

    normalize: bool = Field(False, description="disjoint mean (divide by the agreeing models' weights)")


DARE_VS = ("same distribution, not the same draw: other random masks; survivors scaled by 1/density "
           "(mergekit: to the undropped L1 norm); keep rate and regression slope tested")


def _drop(x: TensorInputs) -> list[torch.Tensor]:
    """Dropped and rescaled task vectors; masks drawn model by model from ``x.generator``."""
    deltas = x.deltas()
    for d, p in zip(deltas, x.per_model, strict=True):
        d.mul_(bernoulli_keep(d, p.density, x.generator))
        if p.rescale and p.density < 1:
            d.div_(p.density)
    return deltas


@merge_method("dare_linear", params=DareParams, needs_base=True, per_model=("density",),
              normaliser=if_normalize("total"), vs_mergekit=DARE_VS,
              paper="Yu et al. 2024, Language models are Super Mario (DARE, arXiv:2311.03099)",
              summary="drop task-vector elements with probability p, rescale by 1/(1-p), add")
def dare_linear(x: TensorInputs) -> torch.Tensor:
    """``base + lambda * sum_i w_i drop(d_i) / (1 - p)``."""
    mixed = weighted_sum(_drop(x), x.weights, x.params.normalize, inplace=True)
    return mixed.mul_(x.params.lambda_).add_(x.base.to(x.work_dtype))


@merge_method("dare_ties", params=DareTiesParams, needs_base=True, per_model=("density",),
              normaliser=if_normalize("subsets"), vs_mergekit=DARE_VS,
              paper="Yu et al. 2024, DARE (arXiv:2311.03099) with TIES sign election (arXiv:2306.01708)",
              summary="DARE drop and rescale, then TIES sign election and disjoint mean")
def dare_ties(x: TensorInputs) -> torch.Tensor:
    """DARE-dropped task vectors merged by TIES' elect + disjoint mean."""
    mixed = elect_and_mean(_drop(x), x.weights, x.params.normalize)
    return mixed.mul_(x.params.lambda_).add_(x.base.to(x.work_dtype))
