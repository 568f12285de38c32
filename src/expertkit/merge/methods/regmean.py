"""RegMean: merge linear layers by solving for the weight that best matches every model's outputs.

Semantics: for a linear weight ``W_i`` of shape ``(out, in)`` with input Gram matrix
``G_i = X_i^T X_i`` (``(in, in)``, from :func:`expertkit.merge.stats.gram_matrices` on a
calibration set), the merged weight minimises ``sum_i |X_i W^T - X_i W_i^T|^2``:
``W = (sum_i W_i G~_i) (sum_i G~_i)^-1`` with ``G~_i = alpha G_i + (1 - alpha) diag(G_i)`` (the
paper's shrinkage of off-diagonal terms) and ``ridge * mean(diag)`` added to the diagonal of the
sum for stability. Per-model weights multiply the Gram matrices. Tensors without Gram matrices
(embeddings, norms, biases) are the weighted mean. mergekit has no RegMean.
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method, weighted_sum


class RegMeanParams(MethodParams):
    """Parameters of ``regmean``."""

    alpha: float = Field(0.9, ge=0.0, le=1.0, description="keep this fraction of the Gram off-diagonal")
    ridge: float = Field(1e-6, ge=0.0, description="added to the diagonal, relative to its mean")


@merge_method("regmean", params=RegMeanParams, min_models=1, stats="gram", normaliser=lambda p: "total",
              paper="Jin et al. 2023, Dataless knowledge fusion by merging weights of language models (arXiv:2212.09849)",
              summary="linear layers from input Gram matrices; other tensors averaged")
def regmean(x: TensorInputs) -> torch.Tensor:
    """``(sum_i W_i G_i)(sum_i G_i)^-1`` for 2-D weights with Gram matrices; the mean otherwise."""
    stats = x.stats or [None] * len(x.tensors)
    if any(g is None for g in stats) or x.tensors[0].dim() != 2:
        return weighted_sum(x.tensors, x.weights, True, x.work_dtype)
    a = x.params.alpha
    dt = torch.float64  # the solve is done in float64 for accuracy
    d_in = x.tensors[0].shape[1]
    num = torch.zeros(x.tensors[0].shape, dtype=dt)  # (out, in)
    den = torch.zeros(d_in, d_in, dtype=dt)  # (in, in)
    for w_i, g, w in zip(x.tensors, stats, x.weights, strict=True):
        g = g.to(dt)
        g = a * g + (1 - a) * torch.diag(torch.diagonal(g))  # (in, in)
        num.add_(w_i.to(dt) @ g, alpha=w)  # (out, in) @ (in, in)
        den.add_(g, alpha=w)
    den.diagonal().add_(x.params.ridge * float(den.diagonal().mean().abs().clamp(min=1e-30)))
    # W den = num  <=>  den^T W^T = num^T; den is symmetric
    merged = torch.linalg.solve(den, num.T).T  # (out, in)
    return merged.to(x.work_dtype)
