"""A Krylov (Lanczos) solver for damped curvature systems ``(G + λI) x = g``, for every λ at once.

Hessian-free Newton (Newton-CG on curvature-vector products) and Levenberg-Marquardt damping fit
together through one fact: the Krylov space ``K_m(G, g)`` does not change when ``G`` is shifted by
``λI``. :func:`lanczos` builds an orthonormal basis ``Q`` ``(n, m)`` of ``K_m(G, g)`` and the
tridiagonal ``T = Qᵀ G Q`` ``(m, m)`` from ``m`` operator products; then, for any λ,

    x(λ) = Q (T + λI)⁻¹ ‖g‖ e₁

is the iterate that ``m`` steps of conjugate gradients on ``(G + λI) x = g`` would return (in exact
arithmetic), and the quadratic model's terms are ``gᵀx = ‖g‖ y₁`` and ``xᵀGx = yᵀTy`` with
``y = (T + λI)⁻¹ ‖g‖ e₁``. So a Levenberg-Marquardt step that rejects a trial and raises λ costs
one loss evaluation, no new curvature products. The eigenvalues of ``T`` (Ritz values) estimate the
extremal eigenvalues of ``G``: they lie inside its spectrum, so the κ they give is the exact κ of
the projected system that is solved and a lower estimate of the full system's κ.

Written here rather than taken from scipy (measured reason): ``scipy.sparse.linalg`` exposes no
Lanczos tridiagonalisation from a given start vector (``eigsh`` restarts inside ARPACK and returns
neither ``Q`` nor ``T``), and its ``cg`` neither reuses a basis across shifts nor returns the
coefficients; ``scipy.linalg.eigh_tridiagonal`` does the eigenvalues of ``T``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from expertkit.errors import ConfigError


@dataclass
class KrylovBasis:
    """``Q`` ``(n, m)``, the tridiagonal ``T`` (``alpha`` ``(m,)``, ``beta`` ``(m-1,)``) and ``‖g‖``."""

    Q: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    gnorm: float
    matvecs: int

    @property
    def dim(self) -> int:
        """Dimension m of the Krylov space (smaller than asked for on an invariant subspace)."""
        return int(self.alpha.numel())

    def T(self) -> torch.Tensor:
        """The ``(m, m)`` tridiagonal ``Qᵀ G Q`` (float64)."""
        t = torch.diag(self.alpha)
        if self.beta.numel():
            t = t + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)
        return t

    def ritz(self) -> np.ndarray:
        """Eigenvalues of ``T`` (ascending): Ritz estimates of ``G``'s spectrum."""
        if self.dim == 1:
            return self.alpha.numpy().copy()
        return eigh_tridiagonal(self.alpha.numpy(), self.beta.numpy(), eigvals_only=True)

    def solve(self, lam: float) -> tuple[torch.Tensor, float, float]:
        """``x(λ)`` ``(n,)``, ``gᵀx`` and ``xᵀGx`` for the damped system (see the module doc)."""
        t = self.T() + lam * torch.eye(self.dim, dtype=torch.float64)  # (m, m)
        rhs = torch.zeros(self.dim, dtype=torch.float64)
        rhs[0] = self.gnorm
        y = torch.linalg.solve(t, rhs)  # (m,)
        return self.Q @ y, float(self.gnorm * y[0]), float(y @ self.T() @ y)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, m: int, *, tol: float = 1e-10) -> KrylovBasis:
    """``m`` Lanczos steps on the symmetric operator ``matvec`` started at ``g`` ``(n,)`` (float64).

    Full reorthogonalisation (twice, classical Gram-Schmidt) keeps ``Q`` orthonormal: ``m`` is a few
    tens, so ``Q`` ``(n, m)`` is small and the products dominate the cost. Stops early when the space
    is invariant (``β < tol · ‖T‖``), where the Krylov solution is exact.
    """
    if m < 1:
        raise ConfigError(f"the Krylov dimension must be at least 1, got {m}.")
    g = g.detach().double().reshape(-1)
    gnorm = float(g.norm())
    if gnorm == 0.0:
        raise ConfigError("Lanczos needs a non-zero start vector (the gradient is zero).")
    n = g.numel()
    m = min(m, n)
    Q = torch.zeros(n, m, dtype=torch.float64)  # (n, m)
    alpha, beta = [], []
    q = g / gnorm
    scale = 0.0
    for j in range(m):
        Q[:, j] = q
        w = matvec(q).detach().double().reshape(-1)  # (n,)
        a = float(q @ w)
        alpha.append(a)
        for _ in range(2):  # full reorthogonalisation against q_0..q_j
            w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        b = float(w.norm())
        scale = max(scale, abs(a), b)
        if j == m - 1 or b <= tol * max(scale, 1e-300):
            break
        beta.append(b)
        q = w / b
    k = len(alpha)
    return KrylovBasis(Q[:, :k].clone(), torch.tensor(alpha, dtype=torch.float64),
                       torch.tensor(beta[: k - 1], dtype=torch.float64), gnorm, k)
