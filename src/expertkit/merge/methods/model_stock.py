"""Model Stock: interpolate between the base and the average by the angle between task vectors.

Semantics, per tensor (whole tensor flattened, or row by row with ``filter_wise``): with ``N``
models and task vectors ``d_i = theta_i - base``, ``cos`` is the mean over pairs ``i < j`` of
``<d_i, d_j> / max(|d_i| |d_j|, 1e-6)`` (each clamped to [-1, 1]); ``t = N cos / (1 + (N-1) cos)``
and ``out = t * mean_i theta_i + (1 - t) * base``. Where ``|1 + (N-1) cos| < 1e-6`` the base is
kept. Weights are ignored. Needs a base and at least two models (mergekit asks for three; with
two the formula is the paper's and well defined).
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method


class ModelStockParams(MethodParams):
    """Parameters of ``model_stock``."""

    filter_wise: bool = Field(False, description="one ratio t per output row instead of per tensor")


@merge_method("model_stock", params=ModelStockParams, needs_base=True, min_models=2, uses_weights=False,
              vs_mergekit="equal (1e-6)",
              paper="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
              summary="interpolate base and average by the angle between task vectors")
def model_stock(x: TensorInputs) -> torch.Tensor:
    """``t * mean(theta) + (1 - t) * base`` with ``t`` from the mean pairwise cosine."""
    base = x.work(x.base)
    shape = base.shape
    rows = x.params.filter_wise and base.dim() > 1
    flat = (lambda t: t.reshape(t.shape[0], -1)) if rows else (lambda t: t.reshape(1, -1))
    deltas = [flat(d) for d in x.deltas()]  # (rows, cols)
    cos = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1:]:
            norm = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)  # (rows,)
            cos.append(((a * b).sum(dim=-1) / norm).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)  # (rows, 1)
    n = len(deltas)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    avg = sum(deltas) / n  # mean task vector: mean(theta) - base
    return (flat(base) + t * avg).reshape(shape)
