"""Karcher mean: the Riemannian barycenter of the models' directions, with their mean norm.

Semantics, per tensor, flattened (the Karcher / Fréchet mean on the unit sphere, Karcher 1977,
as mergekit documents ``karcher``): with norms ``n_i`` and directions ``u_i = theta_i / n_i``, start
from ``m = normalize(mean_i u_i)`` and repeat at most ``max_iter`` times: map every ``u_i`` to the
tangent space at ``m`` (``log_m(u_i) = theta_i (u_i - cos_i m) / |u_i - cos_i m|``, ``cos_i = <u_i, m>``,
``theta_i = acos(cos_i)``), average, stop when the mean tangent is shorter than ``tol``, else move
along it (``m <- cos|g| m + sin|g| g/|g|``). The result is ``mean_i(n_i) * m``. Models weigh
equally (mergekit's karcher has no weights); a base is not used. A zero tensor has no direction
(all-zero inputs give 0); directions that cancel at the start (opposite tensors) are refused.

Memory: ``m`` stays in the span of the ``u_i``, so the iteration runs on the coefficients of
``m = sum_i c_i u_i`` with the Gram matrix ``<u_i, u_j>`` (float64, N x N): the tensors are read
for the Gram matrix and once more for the final weighted sum, and no iterate of the tensor's
size is kept. Same as mergekit 0.1.5's ``karcher`` (measured, including ``max_iter``).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from expertkit.errors import IncompatibleModelsError
from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method

EPS = 1e-8  # norms and tangent lengths below this count as 0


class KarcherParams(MethodParams):
    """Parameters of ``karcher``."""

    max_iter: int = Field(10, ge=0, description="most iterations of the mean on the sphere")
    tol: float = Field(1e-5, ge=0.0, description="stop when the mean tangent vector is shorter than this")


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Coefficients ``c`` of the Karcher mean ``m = sum_i c_i u_i`` of unit vectors with Gram matrix ``gram``."""
    n = gram.shape[0]
    eye = torch.eye(n, dtype=gram.dtype)

    def unit(c: torch.Tensor) -> torch.Tensor:
        return c / math.sqrt(max(float(c @ gram @ c), EPS * EPS))

    c = unit(torch.full((n,), 1.0 / n, dtype=gram.dtype))  # (N,)
    for _ in range(max_iter):
        cos = (gram @ c).clamp(-1, 1)  # (N,): <u_i, m>
        theta = torch.acos(cos)
        perp = eye - cos[:, None] * c[None, :]  # (N, N): row i = u_i - cos_i m, as coefficients
        length = torch.sqrt(torch.einsum("ij,jk,ik->i", perp, gram, perp).clamp(min=0))  # (N,)
        scale = torch.where(length > EPS, theta / length.clamp(min=EPS), torch.zeros_like(theta))
        g = (scale[:, None] * perp).mean(0)  # (N,): the mean tangent vector
        g_len = math.sqrt(max(float(g @ gram @ g), 0.0))
        if g_len < tol:
            break
        c = unit(math.cos(g_len) * c + math.sin(g_len) * g / g_len)
    return c


@merge_method("karcher", params=KarcherParams, min_models=1, uses_weights=False, vs_mergekit="equal (1e-6)",
              paper="Karcher 1977, Riemannian center of mass; mergekit's karcher (Riemannian barycenter)",
              summary="Karcher mean of the directions on the sphere, times the mean norm")
def karcher(x: TensorInputs) -> torch.Tensor:
    """``mean_i(n_i) * sum_i c_i u_i`` with ``c`` from :func:`karcher_coefficients`."""
    vs = [t.to(x.work_dtype).reshape(-1) for t in x.tensors]  # (numel,) each; views when already float32
    norms = [float(v.norm()) for v in vs]
    inv = [1.0 / n if n > EPS else 0.0 for n in norms]  # a zero tensor has no direction
    k = len(vs)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            gram[i, j] = gram[j, i] = float(torch.dot(vs[i], vs[j])) * inv[i] * inv[j]
    mean_norm = sum(norms) / k
    if mean_norm == 0:
        return torch.zeros(x.tensors[0].shape, dtype=x.work_dtype)
    start = torch.full((k,), 1.0 / k, dtype=torch.float64)
    if float(start @ gram @ start) < EPS * EPS:
        raise IncompatibleModelsError(f"karcher: the directions of '{x.name}' cancel (e.g. opposite tensors), so "
                                      "they have no mean on the sphere; merge other models or use linear.")
    c = karcher_coefficients(gram, x.params.max_iter, x.params.tol)
    out = torch.zeros(x.tensors[0].shape, dtype=x.work_dtype)
    for v, ci, s in zip(vs, c.tolist(), inv, strict=True):
        out.view(-1).add_(v, alpha=ci * s * mean_norm)
    return out
