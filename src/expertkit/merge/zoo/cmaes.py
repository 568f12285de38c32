"""A small CMA-ES (numpy only) for merge coefficients under an evaluation budget.

:func:`cmaes_minimize` is the (mu/mu_w, lambda)-CMA-ES as given in N. Hansen, *The CMA Evolution
Strategy: A Tutorial* (arXiv:1604.00772), with its default strategy parameters:

* ``lambda = 4 + floor(3 ln n)`` candidates per generation, the best ``mu = lambda // 2``
  recombined with log-decreasing positive weights ``w_i`` (``mu_eff = 1 / sum w_i^2``);
* cumulative step-size adaptation (CSA): the conjugate evolution path ``p_sigma`` and
  ``sigma <- sigma * exp((c_sigma / d_sigma) (|p_sigma| / E|N(0, I)| - 1))``;
* covariance update from the rank-one term (evolution path ``p_c``, with the ``h_sigma`` stall
  of ``p_c``) and the rank-mu term (the selected steps), eigendecomposition of ``C`` refreshed
  every generation (n is small here: one coefficient per merged model).

Box bounds are handled by repair: a candidate is clipped into the box before it is evaluated and
the clipped point is what the update sees. The **budget** is a hard cap on objective calls: the
last generation is cut short when the budget runs out (its partial population still updates the
mean when it holds at least ``mu`` points), and nothing is evaluated after it. Seeded: the same
seed and objective give the same calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from expertkit.errors import ConfigError


@dataclass
class CmaResult:
    """The best point found, its value, and every evaluation in order."""

    x: np.ndarray
    fx: float
    evaluations: int
    generations: int
    sigma: float
    history: list[tuple[list[float], float]] = field(default_factory=list)


def cmaes_minimize(  # noqa: PLR0913, PLR0915 - the strategy's state is local on purpose
    f: Callable[[np.ndarray], float],
    x0: Sequence[float],
    sigma0: float,
    *,
    budget: int,
    bounds: tuple[float, float] | None = None,
    popsize: int | None = None,
    seed: int = 0,
    ftarget: float | None = None,
) -> CmaResult:
    """Minimise ``f`` from ``x0`` with initial step ``sigma0``, calling ``f`` at most ``budget`` times.

    ``bounds`` = ``(low, high)`` for every coordinate (repair by clipping); ``popsize`` overrides
    ``lambda``; ``ftarget`` stops early once a value at or below it is seen.
    """
    mean = np.asarray(x0, dtype=float).copy()
    n = mean.size
    if n < 1:
        raise ConfigError("CMA-ES needs at least one coordinate.")
    if budget < 1:
        raise ConfigError(f"the CMA-ES evaluation budget must be at least 1, got {budget}.")
    if not sigma0 > 0:
        raise ConfigError(f"the CMA-ES initial step sigma0 must be positive, got {sigma0}.")
    lo, hi = bounds if bounds is not None else (-math.inf, math.inf)
    if lo >= hi:
        raise ConfigError(f"CMA-ES bounds must satisfy low < high, got {bounds}.")
    mean = np.clip(mean, lo, hi)
    rng = np.random.default_rng(seed)
    lam = int(popsize) if popsize else 4 + int(3 * math.log(n))
    lam = max(lam, 2)
    mu = lam // 2
    w = math.log((lam + 1) / 2) - np.log(np.arange(1, mu + 1))
    w /= w.sum()  # (mu,) positive recombination weights
    mu_eff = 1.0 / float((w**2).sum())
    c_sigma = (mu_eff + 2) / (n + mu_eff + 5)
    d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_sigma
    c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)
    c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)
    c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))  # E|N(0, I)|

    sigma = float(sigma0)
    cov = np.eye(n)
    basis, scale = np.eye(n), np.ones(n)  # cov = basis diag(scale^2) basis^T
    p_sigma, p_c = np.zeros(n), np.zeros(n)
    best_x, best_f = mean.copy(), math.inf
    history: list[tuple[list[float], float]] = []
    used = gen = 0
    while used < budget:
        gen += 1
        z = rng.standard_normal((lam, n))  # (lambda, n)
        y = (z * scale) @ basis.T  # (lambda, n): steps ~ N(0, C)
        xs, ys, fs = [], [], []
        for k in range(lam):
            if used >= budget:
                break
            x = np.clip(mean + sigma * y[k], lo, hi)
            fx = float(f(x))
            used += 1
            history.append((x.tolist(), fx))
            xs.append(x)
            ys.append((x - mean) / sigma)  # the repaired step
            fs.append(fx)
            if fx < best_f:
                best_x, best_f = x.copy(), fx
        if len(fs) < mu or (ftarget is not None and best_f <= ftarget):
            break  # a cut-short generation too small to recombine, or the target is reached
        order = np.argsort(fs, kind="stable")[:mu]
        y_sel = np.asarray(ys)[order]  # (mu, n)
        y_w = w @ y_sel  # (n,)
        mean = mean + sigma * y_w
        inv_sqrt = basis @ np.diag(1 / scale) @ basis.T  # C^{-1/2}
        p_sigma = (1 - c_sigma) * p_sigma + math.sqrt(c_sigma * (2 - c_sigma) * mu_eff) * (inv_sqrt @ y_w)
        norm_ps = float(np.linalg.norm(p_sigma))
        h_sigma = norm_ps / math.sqrt(1 - (1 - c_sigma) ** (2 * gen)) < (1.4 + 2 / (n + 1)) * chi_n
        p_c = (1 - c_c) * p_c + (math.sqrt(c_c * (2 - c_c) * mu_eff) * y_w if h_sigma else 0.0)
        delta = (1 - float(h_sigma)) * c_c * (2 - c_c)  # variance lost when p_c stalls
        rank_mu = (y_sel.T * w) @ y_sel  # (n, n)
        cov = (1 + c_1 * delta - c_1 - c_mu) * cov + c_1 * np.outer(p_c, p_c) + c_mu * rank_mu
        sigma *= math.exp((c_sigma / d_sigma) * (norm_ps / chi_n - 1))
        cov = (cov + cov.T) / 2
        eigval, basis = np.linalg.eigh(cov)
        scale = np.sqrt(np.maximum(eigval, 1e-20))
        if sigma * float(scale.max()) < 1e-14:
            break  # converged to machine precision: the remaining budget would be wasted
    return CmaResult(best_x, best_f, used, gen, sigma, history)
