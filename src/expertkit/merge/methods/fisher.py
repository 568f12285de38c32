"""Fisher-weighted averaging with a diagonal Fisher estimated on a calibration set.

Semantics, per tensor and element: ``out = sum_i w_i F_i theta_i / sum_i w_i F_i`` where ``F_i``
is model *i*'s diagonal Fisher for this tensor (:func:`expertkit.merge.stats.diagonal_fisher`:
the mean over calibration examples of the squared gradient of the example's log-likelihood),
plus ``eps`` added to every ``F_i`` so that elements no example touched fall back to the
weighted mean (and where every ``w_i F_i`` is 0 the result is the weighted mean). With ``normalize_fisher`` each model's Fisher is first divided by its mean over
the tensor (so models with larger gradients do not dominate every tensor). A tensor without
statistics for a model (e.g. non-trained buffers) uses ``F_i = 1``. mergekit has no Fisher merge.
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method, weighted_sum


class FisherParams(MethodParams):
    """Parameters of ``fisher``."""

    eps: float = Field(1e-8, ge=0.0, description="added to every Fisher entry (fallback to the plain mean)")
    normalize_fisher: bool = Field(False, description="divide each model's Fisher by its mean over the tensor")


@merge_method("fisher", params=FisherParams, min_models=1, stats="fisher", normaliser=lambda p: "total",
              paper="Matena & Raffel 2022, Merging models with Fisher-weighted averaging (arXiv:2111.09832)",
              summary="element-wise average weighted by each model's diagonal Fisher")
def fisher(x: TensorInputs) -> torch.Tensor:
    """``sum_i w_i F_i theta_i / sum_i w_i F_i`` element-wise."""
    num = torch.zeros_like(x.work(x.tensors[0]))
    den = torch.zeros_like(num)
    stats = x.stats or [None] * len(x.tensors)
    for t, w, f in zip(x.tensors, x.weights, stats, strict=True):
        if f is not None and f.shape != num.shape:
            from expertkit.errors import IncompatibleModelsError

            raise IncompatibleModelsError(f"the Fisher of '{x.name}' has shape {list(f.shape)}, the weight "
                                          f"{list(num.shape)}; the statistics belong to another model.")
        f = torch.ones_like(num) if f is None else x.work(f)
        if x.params.normalize_fisher:
            f.div_(f.mean().clamp(min=1e-30))
        f.add_(x.params.eps).mul_(w)
        num.addcmul_(f, t.to(num.dtype))
        den.add_(f)
    empty = den == 0  # no model has information here: the weighted mean
    mean = weighted_sum(x.tensors, x.weights, True, num.dtype)
    return torch.where(empty, mean, num.div_(den.masked_fill_(empty, 1)))
