"""SLERP: spherical linear interpolation between two models.

Semantics, per tensor, flattened to one vector (whole-tensor SLERP): with ``v0`` the base (or
the first model when no base is given) and ``v1`` the other model, ``cos = <v0/|v0|, v1/|v1|>``
clamped to [-1, 1]. When ``|cos| > dot_threshold`` the vectors are (anti)parallel and the result
is the linear interpolation ``(1 - t) v0 + t v1``; otherwise, with ``theta = acos(cos)``,
``sin((1-t) theta)/sin(theta) * v0 + sin(t theta)/sin(theta) * v1`` (applied to the
un-normalised vectors). Norms below ``eps`` count as 1. ``t = 0`` gives ``v0``.

Difference from mergekit 0.1.5 ``slerp``: same formula and threshold; mergekit requires a base
plus exactly one model, expertkit also takes two models and no base. Per-model weights are
ignored (use ``t``).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method


class SlerpParams(MethodParams):
    """Parameters of ``slerp``."""

    t: float = Field(0.5, description="interpolation factor: 0 gives the base (or first model), 1 the other")
    dot_threshold: float = Field(0.9995, gt=0.0, le=1.0, description="|cos| above this: linear interpolation")
    eps: float = Field(1e-8, gt=0.0, description="norms below this count as 1")


def slerp_tensors(v0: torch.Tensor, v1: torch.Tensor, t: float, dot_threshold: float = 0.9995,
                  eps: float = 1e-8) -> torch.Tensor:
    """SLERP of two same-shaped tensors (see the module docstring); returns a new tensor."""
    a, b = v0.reshape(-1), v1.reshape(-1)  # (n,)
    na, nb = float(a.norm()), float(b.norm())
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, float((a / na) @ (b / nb))))
    if abs(dot) > dot_threshold:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (v0 * c0).add_(v1, alpha=c1)


def slerp_along(v0: torch.Tensor, v1: torch.Tensor, t: float, dim: int, dot_threshold: float = 0.9995,
                eps: float = 1e-8) -> torch.Tensor:
    """SLERP of every pair of vectors along ``dim`` (the same rule as :func:`slerp_tensors`, one
    angle per vector); returns a new tensor of the inputs' shape."""
    n0 = v0.norm(dim=dim, keepdim=True)  # (..., 1, ...)
    n1 = v1.norm(dim=dim, keepdim=True)
    n0 = torch.where(n0 > eps, n0, torch.ones_like(n0))
    n1 = torch.where(n1 > eps, n1, torch.ones_like(n1))
    dot = ((v0 / n0) * (v1 / n1)).sum(dim=dim, keepdim=True).clamp(-1, 1)  # cos of each angle
    theta = torch.acos(dot)
    sin = torch.sin(theta)
    linear = dot.abs() > dot_threshold
    safe = torch.where(linear, torch.ones_like(sin), sin)
    c0 = torch.where(linear, torch.full_like(dot, 1 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(linear, torch.full_like(dot, t), torch.sin(t * theta) / safe)
    return c0 * v0 + c1 * v1


@merge_method("slerp", params=SlerpParams, min_models=1, max_models=2, uses_weights=False, optional_base=True,
              vs_mergekit="equal (1e-6); also takes two models without a base (mergekit: base + 1)",
              paper="Shoemake 1985, Animating rotation with quaternion curves (SLERP)",
              summary="spherical interpolation between two models, linear when near-parallel")
def slerp(x: TensorInputs) -> torch.Tensor:
    """SLERP between the base and one model, or between two models when there is no base."""
    pair = ([x.base, x.tensors[0]] if x.base is not None and len(x.tensors) == 1 else list(x.tensors))
    if len(pair) != 2:
        from expertkit.errors import ConfigError

        raise ConfigError("slerp takes exactly two models: a base and one model, or two models and no base "
                          f"(got {len(x.tensors)} model(s){' and a base' if x.base is not None else ''}).")
    p = x.params
    return slerp_tensors(x.work(pair[0]), x.work(pair[1]), p.t, p.dot_threshold, p.eps)
