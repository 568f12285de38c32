"""RAM+ (tensor-local): RAM with each model's unique changes scaled up by how much it overlaps.

Semantics, per tensor (Yuan et al. 2026, arXiv:2601.13572, RAM+; the tensor-local variant
mergekit documents as ``ramplus_tl``): active entries, counts and the shared mean as in
:mod:`~expertkit.merge.methods.ram`. For each model, ``O_i`` is the number of its active entries
that another model also changed and ``U_i`` the number only it changed (in this tensor). Its
unique entries are multiplied by ``lambda_i = 1 + r * min(O_i / U_i, alpha)`` (1 when
``O_i = 0``; a model without unique entries has nothing to scale): a model whose changes are
mostly shared, and so diluted by the averaging elsewhere, gets its unique changes amplified, by
at most ``r * alpha``. Shared entries are averaged as in RAM. Per-model weights play no part.
Same as mergekit 0.1.5's ``ramplus_tl`` (measured: ``lambda_i = 1 + r min(O_i/U_i, alpha)``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method
from expertkit.merge.methods.ram import active_deltas


class RamPlusParams(MethodParams):
    """Parameters of ``ramplus_tl``."""

    r: float = Field(0.1, description="strength of the unique-entry amplification")
    alpha: float = Field(0.2, description="cap on the overlap ratio O/U that drives it")
    epsilon: float = Field(1e-5, ge=0.0, description="|task-vector entry| above this counts as a change")


@merge_method("ramplus_tl", params=RamPlusParams, needs_base=True, min_models=1, uses_weights=False,
              vs_mergekit="equal (1e-6)",
              paper="Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM+, arXiv:2601.13572)",
              summary="RAM with each model's unique changes scaled by its overlap ratio (per tensor)")
def ramplus_tl(x: TensorInputs) -> torch.Tensor:
    """``base + sum_i d_i ([shared] / count + [unique] * lambda_i)``."""
    p = x.params
    deltas, count = active_deltas(x, p.epsilon)
    shared = count > 1  # (*shape)
    unique = count == 1
    total = torch.zeros_like(deltas[0])
    for d in deltas:
        active = d != 0  # inactive entries were zeroed
        o, u = int((active & shared).sum()), int((active & unique).sum())
        lam = 1.0 + p.r * min(o / u, p.alpha) if u > 0 else 1.0
        total.add_(torch.where(unique, d * lam, d / count.clamp(min=1)))
    return total.add_(x.base.to(x.work_dtype))
