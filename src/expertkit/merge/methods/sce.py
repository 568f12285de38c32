"""SCE (Select, Calculate, Erase): variance-selected entries, matrix-level weights, TIES' election.

Semantics, per tensor (Wan et al. 2024, FuseChat, arXiv:2408.07990, as mergekit documents
``sce``), with task vectors ``d_i = theta_i - base``:

1. *Select*: with ``select_topk < 1``, the per-element variance of ``d_1 .. d_N`` across the models
   ranks the elements; the ``k = int(select_topk * m)`` of highest variance are kept in every task
   vector and the rest set to 0, where ``m`` counts the elements whose variance is not 0 (elements
   every model changed identically have nothing to rank by and are never selected; measured on
   mergekit 0.1.5). Elements tied with the k-th variance are all kept. ``select_topk >= 1`` keeps
   everything.
2. *Calculate*: model *i*'s weight is ``mean(d_i^2)`` over the (selected) tensor, divided by the
   sum over the models (a tensor no model changed is the base).
3. *Erase*: the elected sign is that of ``sum_i d_i`` (+ where it is 0); the result is the sum of
   the agreeing ``w_i d_i`` divided by the agreeing weights, added to the base.

mergekit's ``sce`` takes no ``weight``, ``lambda`` or ``normalize``: the weights are computed.
Same as mergekit 0.1.5's ``sce``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, elect_and_mean, merge_method


class SceParams(MethodParams):
    """Parameters of ``sce``."""

    select_topk: float = Field(1.0, ge=0.0, le=1.0, description="fraction of varying elements kept, by variance")


def variance_mask(deltas: list[torch.Tensor], topk: float) -> torch.Tensor:
    """Bool mask of the ``int(topk * m)`` elements of highest variance across the task vectors."""
    mean = torch.zeros_like(deltas[0])
    for d in deltas:
        mean.add_(d)
    mean.div_(len(deltas))
    var = torch.zeros_like(mean)  # (*shape): population variance (only the ranking matters)
    for d in deltas:
        var.addcmul_(d - mean, d - mean)
    del mean
    varying = var[var > 0]
    k = int(topk * varying.numel())
    if k == 0:
        return torch.zeros_like(var, dtype=torch.bool)
    threshold = torch.kthvalue(varying, varying.numel() - k + 1).values  # the k-th largest variance
    return var >= threshold


@merge_method("sce", params=SceParams, needs_base=True, min_models=1, uses_weights=False,
              vs_mergekit="equal (1e-6)",
              paper="Wan et al. 2024, FuseChat: knowledge fusion of chat models (SCE, arXiv:2408.07990)",
              summary="select high-variance entries, weight models by mean square, TIES election")
def sce(x: TensorInputs) -> torch.Tensor:
    """Select by variance, weight by mean square, elect by the plain sum, disjoint weighted mean."""
    deltas = x.deltas()
    if x.params.select_topk < 1:
        mask = variance_mask(deltas, x.params.select_topk)
        for d in deltas:
            d.mul_(mask)
    energy = [float(d.square().mean()) if d.numel() else 0.0 for d in deltas]
    total = sum(energy)
    base = x.base.to(x.work_dtype)
    if total == 0:
        return base.clone()
    weights = [e / total for e in energy]
    mixed = elect_and_mean(deltas, weights, True, votes=[1.0] * len(deltas))
    return mixed.add_(base)
