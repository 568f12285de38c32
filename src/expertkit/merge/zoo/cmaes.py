"""CMA-ES for merge coefficients (and LoraHub weights) under a hard evaluation budget.

:func:`cmaes_minimize` is a thin adapter over the ``cma`` package (N. Hansen's reference
implementation, ``cma.CMAEvolutionStrategy``, driven by ask/tell) with its default strategy
parameters (``lambda = 4 + floor(3 ln n)``, log-decreasing recombination weights, cumulative
step-size adaptation, rank-one/rank-mu and active covariance updates). The adapter adds what
expertkit's callers rely on and ``cma`` does not give as such (each point measured with cma 4.5.0):

* **A hard budget.** ``f`` is called at most ``budget`` times. ``cma``'s ``maxfevals`` is only
  checked between generations, so it overshoots by up to ``lambda - 1`` (``cma.fmin`` with
  ``maxfevals=13`` in 4-D called the objective 17 times). Here the last generation is cut short;
  its partial population is still told to ``cma`` when it holds at least ``mu`` points.
* **Best so far.** The result is the best point *evaluated*, not ``cma``'s final mean.
* **Seeded without side effects.** ``cma``'s ``seed`` option reseeds numpy's global generator and
  ``seed=0`` means "seed from the clock"; the adapter passes ``cma`` its own ``randn`` drawn from
  ``numpy.random.default_rng(seed)`` instead, so every seed (0 included) is deterministic and the
  caller's global random state is untouched.
* **The whole budget is spent** unless a target is reached or the search has converged in ``x``.
  ``cma``'s stops on flat function values are turned off (``tolfun``, ``tolfunhist``,
  ``tolflatfitness``, ``tolstagnation``): merge candidates are scored by accuracy on a small
  validation split, whose values come in plateaus, and with the defaults ``cma`` stopped after 6
  of 400 allowed evaluations on a plateau (``tolfun``), and after 119 on a 10-example
  accuracy-like objective (``tolflatfitness``). The ``x``-based stops (``tolx``,
  ``tolxstagnation``, ``noeffect*``, ``tolconditioncov``, ``tolfacupx``) are kept.
* **Batches.** Each generation's points are independent of each other, so a batch objective
  ``f_many(list_of_x) -> list_of_f`` may score them all at once (e.g. as parallel jobs); it gets
  the same points in the same order as ``f`` would, one call per generation (the last one cut at
  the budget), and the result (history, best, stop) is the same as with ``f``.
* **Box bounds** by ``cma``'s ``BoundTransform`` (the default boundary handler): every candidate
  ``ask`` returns, and so every evaluated point, lies inside ``[low, high]``. (The hand-written
  optimiser this replaces clipped candidates into the box instead.) ``x0`` is clipped into the box.
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
    stop: str = "budget"  # why the search ended: budget, ftarget, or a cma termination criterion


def cmaes_minimize(  # noqa: PLR0913 - the caller-facing knobs of one search
    f: Callable[[np.ndarray], float] | None,
    x0: Sequence[float],
    sigma0: float,
    *,
    budget: int,
    bounds: tuple[float, float] | None = None,
    popsize: int | None = None,
    seed: int = 0,
    ftarget: float | None = None,
    f_many: Callable[[list[np.ndarray]], Sequence[float]] | None = None,
) -> CmaResult:
    """Minimise ``f`` from ``x0`` with initial step ``sigma0``, calling ``f`` at most ``budget`` times.

    ``bounds`` = ``(low, high)`` for every coordinate; ``popsize`` overrides ``lambda``;
    ``ftarget`` stops after the generation in which a value at or below it is seen. The same
    ``seed`` and objective give the same calls (see the module docstring). ``f_many`` (given
    instead of ``f``, which is then None) scores a whole generation in one call and gives the same
    result as ``f``.
    """
    import cma

    if (f is None) == (f_many is None):
        raise ConfigError("CMA-ES needs exactly one objective: f (one point per call) or f_many (a batch).")
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
    rng = np.random.default_rng(seed)
    opts = {
        "randn": lambda *shape: rng.standard_normal(shape),  # cma calls randn(lambda, n)
        "seed": math.nan,  # nan: cma leaves numpy's global generator alone
        "verbose": -9, "verb_log": 0, "verb_disp": 0,
        "tolfun": 0, "tolfunhist": 0, "tolflatfitness": math.inf, "tolstagnation": math.inf,
    }
    if bounds is not None:
        opts["bounds"] = [lo, hi]
    if popsize:
        opts["popsize"] = max(int(popsize), 2)
    es = cma.CMAEvolutionStrategy(np.clip(mean, lo, hi), float(sigma0), opts)
    best_x, best_f = np.clip(mean, lo, hi), math.inf
    history: list[tuple[list[float], float]] = []
    used = gen = 0
    stop = "budget"
    while used < budget:
        gen += 1
        xs = es.ask()[: budget - used]  # the last generation is cut short at the budget
        points = [np.asarray(x, dtype=float) for x in xs]
        batch = None
        if f_many is not None:
            batch = [float(v) for v in f_many(points)]
            if len(batch) != len(points):
                raise ConfigError(f"the CMA-ES batch objective returned {len(batch)} values for "
                                  f"{len(points)} points; it must return one value per point, in order.")
        fs = []
        for i, x in enumerate(points):
            fx = batch[i] if batch is not None else float(f(x))  # type: ignore[misc]
            used += 1
            history.append((x.tolist(), fx))
            fs.append(fx)
            if fx < best_f:
                best_x, best_f = x.copy(), fx
        if len(fs) < es.sp.weights.mu:
            break  # a cut-short generation too small to recombine
        es.tell(xs, fs)
        if ftarget is not None and best_f <= ftarget:
            stop = "ftarget"
            break
        if es.stop():
            stop = ", ".join(es.stop())  # converged in x (the remaining budget would be wasted)
            break
    return CmaResult(best_x, best_f, used, gen, float(es.sigma), history, stop)
