"""Per-cluster merge strategy, chosen by evaluation on a validation split under a budget.

:func:`select_strategy` follows Model-GLUE's recipe for one cluster of mergeable models:

1. **Individual scores.** Every member is evaluated alone (``n`` evaluations).
2. **Greedy selective merging.** Members are sorted by score (best first); starting from the
   best one, the next member is kept only when the uniform merge (``linear``) of the kept set plus
   it scores at least as well as the best score so far (the average does not drop); otherwise it
   is left out.
3. **Method and coefficient grid.** On the kept members (on all members when greedy kept only
   the best one), each candidate of :data:`DEFAULT_GRID`
   (linear; task arithmetic with lambda 1, 0.5; TIES and DARE-linear with densities 0.5 and 0.3)
   is evaluated in that order. Task-vector methods need the cluster's common base and are
   skipped without one.

   With ``search="cmaes"`` the grid is replaced by a CMA-ES search
   (:func:`~expertkit.merge.zoo.cmaes.cmaes_minimize`) over one merge weight per kept member,
   spending the whole remaining budget: ``task_arithmetic`` (lambda 1, weights in ``[0, 1.5]``,
   start 0.5 each, step 0.3) when the cluster has a base, else ``linear`` (normalised weights in
   ``[0, 1]``, start 0.5 each, step 0.2). The best weights found are the cluster's ``weights``.

Every evaluation counts against ``budget``; when it runs out the remaining candidates are
recorded as skipped. The winner is the highest score, the earliest candidate on ties (so the
simpler method wins a tie); a single merged member that beats every merge is kept as is
(``method: "single"``). Scores are memoised by candidate, so no candidate is evaluated twice.

The evaluator and the merge function are parameters (dependency injection): ``evaluate(tensors)``
returns a validation score for a state dict (of the tensors that vary in the cluster; the rest are
the base's), and ``merge`` defaults to :func:`expertkit.merge.merge_state_dicts`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from expertkit.errors import ConfigError

StateDict = Mapping[str, torch.Tensor]
Evaluator = Callable[[StateDict], float]
MergeFn = Callable[..., dict[str, torch.Tensor]]

#: (method, params) candidates of the grid, in evaluation order.
DEFAULT_GRID: tuple[tuple[str, dict[str, Any]], ...] = (
    ("linear", {}),
    ("task_arithmetic", {"lambda": 1.0}),
    ("ties", {"density": 0.5, "lambda": 1.0}),
    ("dare_linear", {"density": 0.5, "lambda": 1.0}),
    ("task_arithmetic", {"lambda": 0.5}),
    ("ties", {"density": 0.3, "lambda": 1.0}),
    ("dare_linear", {"density": 0.3, "lambda": 1.0}),
)
NEEDS_BASE = frozenset({"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "model_stock"})


@dataclass
class Trial:
    """One evaluated (or skipped) candidate."""

    members: list[str]
    method: str
    params: dict[str, Any]
    score: float | None  # None: skipped (budget, or no base)
    note: str = ""
    weights: list[float] | None = None  # per-member merge weights (CMA-ES candidates)

    def line(self) -> str:
        """One readable line: ``ties{density: 0.5}(a, b) = 0.6250  [grid]`` (weights as ``a*0.7``)."""
        params = "{" + ", ".join(f"{k}: {v}" for k, v in self.params.items()) + "}" if self.params else ""
        score = "skipped" if self.score is None else f"{self.score:.4f}"
        members = (self.members if self.weights is None
                   else [f"{m}*{w:.4g}" for m, w in zip(self.members, self.weights, strict=True)])
        return f"{self.method}{params}({', '.join(members)}) = {score}" + (f"  [{self.note}]" if self.note else "")


@dataclass
class Selection:
    """The chosen strategy of one cluster and everything that was tried."""

    members: list[str]  # kept members (greedy)
    method: str  # a merge method name, or "single"
    params: dict[str, Any]
    score: float
    individual: dict[str, float]
    trials: list[Trial] = field(default_factory=list)
    evaluations: int = 0
    weights: dict[str, float] | None = None  # per-member merge weights (CMA-ES), None: all 1


def _default_merge() -> MergeFn:
    from expertkit.merge import merge_state_dicts

    return merge_state_dicts


def merge_members(
    method: str, members: Sequence[str], models: Mapping[str, StateDict], base: StateDict | None,
    params: Mapping[str, Any], *, merge: MergeFn | None = None, seed: int = 0,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge the named members with ``method`` (one call over their state dicts; ``single`` copies)."""
    if method == "single":
        if len(members) != 1:
            raise ConfigError(f"method 'single' keeps one model, but {len(members)} members are listed.")
        return dict(models[members[0]])
    merge = merge or _default_merge()
    return merge(method, [models[m] for m in members], base if method in NEEDS_BASE else None,
                 weights=weights, params=dict(params), seed=seed)


class _Budget:
    def __init__(self, evaluate: Evaluator, budget: int) -> None:
        self.evaluate, self.left, self.used = evaluate, budget, 0
        self.memo: dict[str, float] = {}

    def __call__(self, key: str, make: Callable[[], StateDict]) -> float | None:
        if key in self.memo:
            return self.memo[key]
        if self.left <= 0:
            return None
        self.left -= 1
        self.used += 1
        self.memo[key] = float(self.evaluate(make()))
        return self.memo[key]


def _key(method: str, members: Sequence[str], params: Mapping[str, Any], weights: Sequence[float] | None = None) -> str:
    if weights is not None:  # order matters with weights
        return json.dumps([method, list(members), dict(params), list(weights)], sort_keys=True)
    return json.dumps([method, sorted(members), dict(params)], sort_keys=True)


SEARCHES = ("grid", "cmaes")
#: CMA-ES settings per method: (params, bounds, start, initial step)
CMAES_SPACE: dict[str, tuple[dict[str, Any], tuple[float, float], float, float]] = {
    "task_arithmetic": ({"lambda": 1.0}, (0.0, 1.5), 0.5, 0.3),
    "linear": ({}, (0.0, 1.0), 0.5, 0.2),
}


def select_strategy(
    models: Mapping[str, StateDict],
    evaluate: Evaluator,
    *,
    base: StateDict | None = None,
    budget: int = 12,
    grid: Sequence[tuple[str, Mapping[str, Any]]] = DEFAULT_GRID,
    greedy: bool = True,
    merge: MergeFn | None = None,
    seed: int = 0,
    search: str = "grid",
) -> Selection:
    """Choose members, method and coefficients for one cluster (see the module docstring).

    Args:
        models: member name -> state dict (same names and shapes; usually only the tensors that
            vary inside the cluster).
        evaluate: validation score of a state dict; higher is better.
        base: the cluster's common base (same names), needed by task-vector methods.
        budget: maximum number of calls to ``evaluate``.
        grid: ``(method, params)`` candidates, evaluated in order.
        greedy: run greedy selective merging (else every member is merged).
        merge: the merge function (default :func:`expertkit.merge.merge_state_dicts`).
        seed: seed of random methods (DARE) and of the CMA-ES search.
        search: ``grid`` (the ``grid`` candidates in order) or ``cmaes`` (per-member weights by
            CMA-ES on the remaining budget; ``grid`` is then unused).
    """
    if search not in SEARCHES:
        raise ConfigError(f"unknown coefficient search {search!r}; use one of {', '.join(SEARCHES)}.")
    names = list(models)
    if not names:
        raise ConfigError("a cluster needs at least one model.")
    if budget < len(names):
        raise ConfigError(f"budget {budget} is below the cluster size {len(names)}: every member is "
                          "evaluated once; raise the budget.")
    run = _Budget(evaluate, budget)
    trials: list[Trial] = []

    def score(method: str, members: list[str], params: Mapping[str, Any], note: str = "",
              weights: list[float] | None = None) -> float | None:
        if method in NEEDS_BASE and base is None:
            trials.append(Trial(members, method, dict(params), None, "skipped: needs the cluster's base"))
            return None
        s = run(_key(method, members, params, weights),
                lambda: merge_members(method, members, models, base, params, merge=merge, seed=seed, weights=weights))
        trials.append(Trial(members, method, dict(params), s, note if s is not None else "skipped: budget", weights))
        return s

    individual = {}
    for m in names:
        individual[m] = score("single", [m], {}, "individual")  # type: ignore[assignment]
    if len(names) == 1:
        return Selection(names, "single", {}, individual[names[0]], individual, trials, run.used)
    order = sorted(names, key=lambda m: (-individual[m], names.index(m)))
    kept, best = [order[0]], individual[order[0]]
    for m in order[1:]:
        if not greedy:
            kept.append(m)
            continue
        s = score("linear", [*kept, m], {}, f"greedy: add {m}")
        if s is not None and s >= best:
            kept.append(m)
            best = s
    chosen: tuple[str, list[str], dict[str, Any], float] = ("single", [order[0]], {}, individual[order[0]])
    if greedy and len(kept) > 1:
        chosen = ("linear", list(kept), {}, best)
    pool = list(kept) if len(kept) > 1 else order  # greedy kept nobody: try the grid on all members
    if search == "cmaes":
        return _cmaes(pool, base is not None, score, run, seed, chosen, individual, trials)
    for method, params in grid:
        s = score(method, pool, params, "grid")
        if s is not None and s > chosen[3]:
            chosen = (method, pool, dict(params), s)
    return Selection(chosen[1], chosen[0], chosen[2], chosen[3], individual, trials, run.used)


def _cmaes(pool: list[str], has_base: bool, score: Callable[..., float | None], run: _Budget, seed: int,
           chosen: tuple[str, list[str], dict[str, Any], float], individual: dict[str, float],
           trials: list[Trial]) -> Selection:
    """Per-member weights of the pool by CMA-ES (maximising the score) on the budget left."""
    from expertkit.merge.zoo.cmaes import cmaes_minimize

    method = "task_arithmetic" if has_base else "linear"
    params, bounds, start, step = CMAES_SPACE[method]
    weights: dict[str, float] | None = None
    if run.left > 0:
        def objective(x: Any) -> float:
            s = score(method, pool, params, "cmaes", [round(float(v), 6) for v in x])
            return -s if s is not None else float("inf")

        res = cmaes_minimize(objective, [start] * len(pool), step, budget=run.left, bounds=bounds, seed=seed)
        if -res.fx > chosen[3]:
            chosen = (method, pool, dict(params), -res.fx)
            weights = {m: round(float(v), 6) for m, v in zip(pool, res.x, strict=True)}
    return Selection(chosen[1], chosen[0], chosen[2], chosen[3], individual, trials, run.used, weights)
