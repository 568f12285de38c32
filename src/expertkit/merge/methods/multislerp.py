"""Multi-SLERP: a spherical weighted mean of any number of models (or task vectors).

Semantics, per tensor, flattened (the definition mergekit documents for ``multislerp``, after
Goddard, "Multi-SLERP", goddard.blog): with vectors ``v_i`` (the models, or ``theta_i - base``
when a base is given), weights ``w_i`` (divided by their sum when ``normalize_weights``), norms
``n_i`` and directions ``u_i = v_i / n_i``: the direction is the weighted mean ``sum_i w_i u_i``
projected back onto the sphere (mergekit's "tangent space at the weighted Euclidean mean" step
lands exactly there), the length is the weighted mean norm ``sum_i w_i n_i``:
``out = [base +] (sum_i w_i n_i) * m / |m|``, ``m = sum_i w_i u_i``. Norms below ``eps`` count as
``eps``; a zero vector (a model equal to the base) adds no direction and a zero length. For two
models with equal weights this is the SLERP midpoint. Where the directions cancel (``|m| < eps``:
every task vector 0, as for norm weights no model changed, or opposite inputs) there is no mean
direction and the result is the base (0 without a base), as mergekit returns. Same as mergekit
0.1.5's ``multislerp`` (measured).
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method


class MultiSlerpParams(MethodParams):
    """Parameters of ``multislerp``."""

    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, description="norms below this count as eps")


@merge_method("multislerp", params=MultiSlerpParams, min_models=1, optional_base=True,
              normaliser=lambda p: "total" if p.normalize_weights else None, vs_mergekit="equal (1e-6)",
              paper="Goddard, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea), mergekit",
              summary="spherical weighted mean: mean direction on the sphere, mean norm")
def multislerp(x: TensorInputs) -> torch.Tensor:
    """``[base +] (sum_i w_i |v_i|) * normalize(sum_i w_i v_i / |v_i|)``."""
    eps = x.params.eps
    ws = list(x.weights)
    if x.params.normalize_weights:
        s = sum(ws)
        ws = [w / s for w in ws]
    base = x.base.to(x.work_dtype) if x.base is not None else None
    m = torch.zeros(x.tensors[0].shape, dtype=x.work_dtype)
    length = 0.0
    for t, w in zip(x.tensors, ws, strict=True):
        v = t.to(x.work_dtype) if base is None else t.to(x.work_dtype) - base
        n = max(float(v.norm()), eps)
        m.add_(v, alpha=w / n)
        length += w * n
    norm = float(m.norm())
    m.mul_(length / norm if norm >= eps else 0.0)  # no mean direction: the base (0 without one)
    return m.add_(base) if base is not None else m
