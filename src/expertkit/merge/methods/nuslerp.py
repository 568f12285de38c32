"""NuSLERP: SLERP of two models (or of their task vectors) with the factor from their weights,
over the whole tensor or row by row.

Semantics, per tensor (the definition mergekit documents for ``nuslerp``): with the two models'
weights ``w_1, w_2``, ``t = w_2 / (w_1 + w_2)`` (weights that sum to about 0 are refused). Without
a base, ``out = slerp(theta_1, theta_2, t)``; with a base (a third model, distinct from the two),
``out = base + slerp(theta_1 - base, theta_2 - base, t)``. ``slerp`` is
:func:`~expertkit.merge.methods.slerp.slerp_tensors` (linear interpolation where
``|cos| > 0.9995``). With ``nuslerp_flatten`` (default) the whole tensor is one vector; without
it each vector along the last dimension (each row ``W[i, :]``) is interpolated with its own
angle, or, with ``nuslerp_row_wise``, each vector along the first dimension (``W[:, j]``). (The
row/column naming is mergekit's; measured: ``nuslerp_row_wise: true`` interpolates ``W[:, j]``.)
A vector is always interpolated whole. Same as mergekit 0.1.5's ``nuslerp``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method
from expertkit.merge.methods.slerp import slerp_along, slerp_tensors


class NuSlerpParams(MethodParams):
    """Parameters of ``nuslerp``."""

    nuslerp_flatten: bool = Field(True, description="interpolate the whole tensor as one vector")
    nuslerp_row_wise: bool = Field(False, description="without flatten: vectors along dim 0 instead of the last dim")


@merge_method("nuslerp", params=NuSlerpParams, min_models=2, max_models=2, optional_base=True,
              normaliser=lambda p: "total", vs_mergekit="equal (1e-6)",
              paper="mergekit's nuslerp (Goddard et al. 2024, arXiv:2403.13257); SLERP: Shoemake 1985",
              summary="SLERP of two models (or task vectors) with t from their weights, whole or per row")
def nuslerp(x: TensorInputs) -> torch.Tensor:
    """``[base +] slerp(v_1, v_2, w_2 / (w_1 + w_2))`` whole or vector by vector."""
    w1, w2 = x.weights
    t = w2 / (w1 + w2)
    v1, v2 = x.work(x.tensors[0]), x.work(x.tensors[1])
    base = x.base.to(x.work_dtype) if x.base is not None else None
    if base is not None:
        v1.sub_(base)
        v2.sub_(base)
    if x.params.nuslerp_flatten or v1.dim() < 2:
        out = slerp_tensors(v1, v2, t)
    else:
        out = slerp_along(v1, v2, t, dim=0 if x.params.nuslerp_row_wise else -1)
    return out.add_(base) if base is not None else out
