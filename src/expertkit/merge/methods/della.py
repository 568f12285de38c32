"""DELLA: magnitude-ranked random drop (MagPrune), rescale, then TIES' sign election.

Semantics, per tensor (Deep et al. 2024, DELLA-Merging, arXiv:2406.11617, with the ranges
mergekit documents): each task vector ``d_i = theta_i - base`` is taken row by row (a 2-D or
larger tensor: along dim 0, each row flattened; a vector: as one row). Within a row of ``n``
entries ranked by magnitude (``r = 0`` the smallest, ``n - 1`` the largest; equal magnitudes by
position), an entry is kept with probability ``p_r = density - epsilon + 2 epsilon r / (n - 1)``:
from ``density - epsilon`` for the smallest to ``density + epsilon`` for the largest (``density``
for a one-entry row). With ``rescale`` (default) a kept entry is divided by its own ``p_r``, so
the expected task vector is unchanged (the paper's rescaling). ``density >= 1`` keeps everything
(mergekit's default); otherwise ``density - epsilon > 0`` and ``density + epsilon < 1`` are
required, as in mergekit. The masks come from the per-tensor seeded generator (``seed``).

* ``della``: then TIES' election of the sign of ``sum_i w_i d_i'`` and the sum of the agreeing
  ``w_i d_i'``, divided by their weights when ``normalize`` (default on, as in mergekit), times
  ``lambda``, added to the base.
* ``della_linear`` (:mod:`~expertkit.merge.methods.della_linear`): ``base + lambda sum_i w_i d_i'``.

Difference from mergekit 0.1.5 (measured): same keep probabilities, other random draws (mergekit:
the global torch RNG), and mergekit's ``rescale`` multiplies the whole kept tensor by
``|d|_1 / |d'|_1`` (one factor per tensor) where expertkit divides each kept entry by its keep
probability; ``rescale: false`` differs only in the draws.
"""

from __future__ import annotations

import torch
from pydantic import AliasChoices, Field, model_validator

from expertkit.merge.methods.base import MethodParams, TensorInputs, elect_and_mean, if_normalize, merge_method


class DellaParams(MethodParams):
    """Parameters of ``della``."""

    density: float = Field(1.0, gt=0.0, le=1.0, description="mean keep probability of each task-vector entry")
    epsilon: float = Field(0.15, ge=0.0, description="keep probabilities span density - epsilon .. density + epsilon")
    rescale: bool = Field(True, description="divide each kept entry by its keep probability")
    lambda_: float = Field(1.0, validation_alias=AliasChoices("lambda", "scaling", "lambda_"),
                           serialization_alias="lambda", description="scale of the merged task vector")
    normalize: bool = Field(True, description="disjoint mean (divide by the agreeing models' weights)")

    @model_validator(mode="after")
    def _range(self) -> DellaParams:
        if self.density < 1 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(f"epsilon {self.epsilon:g} with density {self.density:g} gives keep probabilities "
                             f"{self.density - self.epsilon:g} .. {self.density + self.epsilon:g}; choose epsilon "
                             "so that density - epsilon > 0 and density + epsilon < 1 (as mergekit requires)")
        return self


#: rows per block are chosen so a block holds about this many entries: the sort and the rank of
#: a block are the only extra memory (a whole-tensor sort of a 65M-entry embedding would need ~2 GB)
BLOCK = 1 << 22


def keep_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities of a block of rows ``(r, n)`` from each entry's magnitude rank in its row."""
    n = rows.shape[1]
    if n < 2:
        return torch.full(rows.shape, density, dtype=rows.dtype)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices  # (r, n): ascending magnitude
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand_as(order))  # (r, n): rank of each entry
    return rank.to(rows.dtype).mul_(2 * epsilon / (n - 1)).add_(density - epsilon)


def magprune_(d: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator) -> None:
    """Drop (and rescale) ``d`` in place, block of rows by block; draws come from ``generator``."""
    rows = d.view(d.shape[0], -1) if d.dim() > 1 else d.view(1, -1)  # (rows, n), a view of d
    step = max(1, BLOCK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]  # (r, n)
        prob = keep_probabilities(block, density, epsilon)
        keep = torch.rand(block.shape, generator=generator, dtype=torch.float32) < prob  # (r, n)
        if rescale:
            block.div_(prob)
        block.mul_(keep)


def magprune(x: TensorInputs) -> list[torch.Tensor]:
    """The task vectors after MagPrune's drop (and rescale); masks drawn model by model."""
    deltas = x.deltas()
    for d, p in zip(deltas, x.per_model, strict=True):
        if p.density < 1:
            magprune_(d, p.density, p.epsilon, p.rescale, x.generator)
    return deltas


@merge_method("della", params=DellaParams, needs_base=True, per_model=("density", "epsilon"),
              normaliser=if_normalize("subsets"),
              vs_mergekit="same keep probabilities, other random draws; rescale divides each kept entry by its "
                          "keep probability (mergekit: one L1-norm factor per tensor); keep rates by rank tested",
              paper="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
              summary="drop task-vector entries with magnitude-ranked probabilities, rescale, TIES election")
def della(x: TensorInputs) -> torch.Tensor:
    """MagPrune, then TIES' election and (disjoint) sum."""
    mixed = elect_and_mean(magprune(x), x.weights, x.params.normalize)
    return mixed.mul_(x.params.lambda_).add_(x.base.to(x.work_dtype))
