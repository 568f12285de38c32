"""Condition numbers and κ reduction for symmetric curvature blocks.

* :func:`extremal_eigenvalues`: the smallest and largest eigenvalue, exactly (``numpy.linalg.eigvalsh``)
  for a dense block, or by Lanczos (``scipy.sparse.linalg.eigsh``, implicitly restarted) on a
  matrix-free operator.
* :func:`damping_for`: the shift λ of ``H + λI`` that Q-Newton's regularisation asks for (a
  fraction of ``max|H_ij|``), that makes an indefinite block positive definite, and that
  brings κ down to a target: ``κ(H + λI) = (λ_max + λ) / (λ_min + λ) <= κ_t`` holds for
  ``λ >= (λ_max - κ_t λ_min) / (κ_t - 1)``.
* :func:`kappa_bound`: the estimator the Q-Newton paper derives from the norm and the
  determinant (Guggenheimer, Edelman and Johnson's bound ``κ <= 2/|det A| (‖A‖_F/√N)^N``),
  kept for comparison: it is an upper bound, often far above the true κ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from expertkit.errors import ConfigError


@dataclass(frozen=True)
class Spectrum:
    """Extremal eigenvalues of a symmetric block and how they were found."""

    lmin: float
    lmax: float
    method: str  # "exact" or "lanczos"
    matvecs: int = 0  # operator products spent (Lanczos)

    def kappa(self, shift: float = 0.0) -> float:
        """κ of the block plus ``shift * I``; ``inf`` unless it is positive definite."""
        lo, hi = self.lmin + shift, self.lmax + shift
        if lo <= 0 or hi <= 0:
            return math.inf
        return hi / lo


def exact_extremes(matrix: torch.Tensor) -> Spectrum:
    """Smallest and largest eigenvalue of a dense symmetric ``(n, n)`` matrix."""
    ev = np.linalg.eigvalsh(matrix.detach().double().cpu().numpy())  # (n,) ascending
    return Spectrum(float(ev[0]), float(ev[-1]), "exact")


def lanczos_extremes(
    matvec: Callable[[np.ndarray], np.ndarray], n: int, *, tol: float = 1e-3, maxiter: int | None = None,
    seed: int = 0,
) -> Spectrum:
    """Smallest and largest eigenvalue of a symmetric operator by Lanczos (``eigsh``, k=1 each).

    ``matvec`` maps a float64 vector ``(n,)`` to ``(n,)``. A start vector seeded by ``seed`` keeps
    the result reproducible. Without convergence the best Ritz value found so far is used.
    """
    count = [0]

    def mv(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return matvec(np.asarray(v, dtype=np.float64).reshape(-1))

    op = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    out = []
    for which in ("LA", "SA"):
        try:
            vals = eigsh(op, k=1, which=which, tol=tol, maxiter=maxiter or 20 * n, v0=v0,
                         return_eigenvectors=False)
        except ArpackNoConvergence as exc:
            if not len(exc.eigenvalues):  # a NaN here would only fail later, far from the cause
                raise ConfigError(
                    f"Lanczos found no {'largest' if which == 'LA' else 'smallest'} eigenvalue of a {n} x {n} "
                    f"curvature block in {maxiter or 20 * n} iterations; give it more (lanczos_maxiter) or solve "
                    f"blocks this size exactly (exact_max >= {n}).") from None
            vals = exc.eigenvalues
        out.append(float(vals[0]))
    lmax, lmin = out
    return Spectrum(min(lmin, lmax), max(lmin, lmax), "lanczos", count[0])


def damping_for(
    spec: Spectrum, scale: float, *, damping: float = 0.0, damping_rel: float = 5e-3,
    kappa_target: float | None = None,
) -> float:
    """The shift λ >= 0 for ``H + λI`` (see the module doc); ``scale`` is ``max|H_ij|`` or ``‖H‖``.

    1. ``λ = max(damping, damping_rel * scale)`` (Q-Newton's regularisation: 5e-3 max|H_ij|);
    2. if ``λ_min + λ`` is not positive, shift further so that the smallest eigenvalue becomes
       ``damping_rel * scale`` (a Newton step needs a positive definite system);
    3. with ``kappa_target``, raise λ until ``κ(H + λI) <= kappa_target``.
    """
    floor = max(damping_rel * scale, 1e-12 * max(scale, 1.0))
    lam = max(damping, damping_rel * scale)
    if spec.lmin + lam <= 0:
        lam = -spec.lmin + floor
    if kappa_target is not None and spec.lmax + lam > 0:
        need = (spec.lmax - kappa_target * spec.lmin) / (kappa_target - 1.0)
        lam = max(lam, need)
    return float(lam)


def kappa_bound(matrix: torch.Tensor) -> float:
    """The norm/determinant upper bound on κ used by the Q-Newton paper (``inf`` if singular)."""
    a = matrix.detach().double()
    n = a.shape[0]
    sign, logdet = torch.linalg.slogdet(a)
    if sign == 0:
        return math.inf
    fro = float(torch.linalg.matrix_norm(a, "fro"))
    log_bound = math.log(2.0) - float(logdet) + n * (math.log(fro) - 0.5 * math.log(n))
    return math.exp(log_bound) if log_bound < 700 else math.inf
