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

**Batches.** The candidates that do not depend on each other's scores are also scored as one
batch when an ``evaluate_many(candidates) -> scores`` is given (e.g. one executor job per
candidate, :mod:`expertkit.pipeline.zoo_jobs`): the members' individual scores, the grid, and
each CMA-ES generation (greedy steps depend on the previous one and stay batches of one). The
budget, the memo and the results are exactly those of the one-by-one path: a batch is cut at
the budget in candidate order, memoised or repeated candidates cost nothing, and the evaluations
happen in the same order.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from expertkit.errors import ConfigError

StateDict = Mapping[str, torch.Tensor]
Evaluator = Callable[[StateDict], float]
#: Scores of a batch of candidates, in order (the iterable is consumed once, in order).
BatchEvaluate = Callable[[Iterable[StateDict]], Sequence[float]]
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


@runtime_checkable
class BatchEvaluator(Protocol):
    """An evaluator that can also score a batch of independent candidates at once (as parallel jobs)."""

    def __call__(self, tensors: StateDict) -> float:
        """The validation score of one candidate."""
        ...

    def many(self, candidates: Iterable[StateDict]) -> list[float]:
        """The scores of ``candidates`` in order (the same values ``__call__`` gives one by one)."""
        ...


class _Budget:
    """Evaluations under the budget, memoised by candidate key; one by one or by batches."""

    def __init__(self, evaluate: Evaluator, budget: int, evaluate_many: BatchEvaluate | None = None) -> None:
        self.evaluate, self.evaluate_many, self.left, self.used = evaluate, evaluate_many, budget, 0
        self.memo: dict[str, float] = {}

    def many(self, items: Sequence[tuple[str, Callable[[], StateDict]]]) -> list[float | None]:
        """Scores of ``(key, make)`` items in order (None: over budget), as one-by-one calls give them.

        Without ``evaluate_many`` each new candidate is made and evaluated in turn; with it the
        new candidates (each key once, cut at the budget in order) are made lazily and scored in
        one call. Either way the same keys are charged and memoised.
        """
        keys: list[str | None] = []
        todo: dict[str, Callable[[], StateDict]] = {}  # new keys of this batch, in order
        for key, make in items:
            if key in self.memo or key in todo:
                keys.append(key)
                continue
            if self.left <= 0:
                keys.append(None)
                continue
            self.left -= 1
            self.used += 1
            if self.evaluate_many is None:
                self.memo[key] = float(self.evaluate(make()))
            else:
                todo[key] = make
            keys.append(key)
        if todo and self.evaluate_many is not None:  # todo is filled only in batch mode
            made: Iterator[StateDict] = (make() for make in todo.values())
            scores = [float(v) for v in self.evaluate_many(made)]
            if len(scores) != len(todo):
                raise ConfigError(f"the batch evaluator returned {len(scores)} scores for {len(todo)} "
                                  "candidates; it must return one score per candidate, in order.")
            self.memo.update(zip(todo, scores, strict=True))
        return [None if key is None else self.memo[key] for key in keys]


def _key(method: str, members: Sequence[str], params: Mapping[str, Any], weights: Sequence[float] | None = None) -> str:
    if weights is not None:  # order matters with weights
        return json.dumps([method, list(members), dict(params), list(weights)], sort_keys=True)
    return json.dumps([method, sorted(members), dict(params)], sort_keys=True)


#: A candidate to score: (method, members, params, trial note, per-member weights or None).
_Candidate = tuple[str, list[str], Mapping[str, Any], str, list[float] | None]

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
    evaluate_many: BatchEvaluate | None = None,
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
        evaluate_many: scores of a batch of candidates in order; when given, every evaluation goes
            through it (independent candidates as one batch, see the module docstring) and
            ``evaluate`` is not called. The result is the same as with ``evaluate`` alone.
    """
    if search not in SEARCHES:
        raise ConfigError(f"unknown coefficient search {search!r}; use one of {', '.join(SEARCHES)}.")
    names = list(models)
    if not names:
        raise ConfigError("a cluster needs at least one model.")
    if budget < len(names):
        raise ConfigError(f"budget {budget} is below the cluster size {len(names)}: every member is "
                          "evaluated once; raise the budget.")
    run = _Budget(evaluate, budget, evaluate_many)
    trials: list[Trial] = []

    def score_many(cands: Sequence[_Candidate]) -> list[float | None]:
        """Score candidates that do not depend on each other (one batch); trials in candidate order."""
        runnable = [c for c in cands if not (c[0] in NEEDS_BASE and base is None)]
        got = iter(run.many([
            (_key(method, members, params, weights),
             functools.partial(merge_members, method, members, models, base, params, merge=merge, seed=seed,
                               weights=weights))
            for method, members, params, _, weights in runnable]))
        out: list[float | None] = []
        for method, members, params, note, weights in cands:
            if method in NEEDS_BASE and base is None:
                trials.append(Trial(members, method, dict(params), None, "skipped: needs the cluster's base"))
                out.append(None)
                continue
            s = next(got)
            trials.append(Trial(members, method, dict(params), s, note if s is not None else "skipped: budget",
                                weights))
            out.append(s)
        return out

    def score(method: str, members: list[str], params: Mapping[str, Any], note: str = "",
              weights: list[float] | None = None) -> float | None:
        return score_many([(method, members, params, note, weights)])[0]

    individual: dict[str, float] = dict(zip(  # type: ignore[arg-type] - the budget covers every member
        names, score_many([("single", [m], {}, "individual", None) for m in names]), strict=True))
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
        return _cmaes(pool, base is not None, score, score_many, run, seed, chosen, individual, trials)
    scores = score_many([(method, pool, params, "grid", None) for method, params in grid])
    for (method, params), s in zip(grid, scores, strict=True):
        if s is not None and s > chosen[3]:
            chosen = (method, pool, dict(params), s)
    return Selection(chosen[1], chosen[0], chosen[2], chosen[3], individual, trials, run.used)


def _cmaes(pool: list[str], has_base: bool, score: Callable[..., float | None],
           score_many: Callable[[Sequence[_Candidate]], list[float | None]], run: _Budget, seed: int,
           chosen: tuple[str, list[str], dict[str, Any], float], individual: dict[str, float],
           trials: list[Trial]) -> Selection:
    """Per-member weights of the pool by CMA-ES (maximising the score) on the budget left.

    In batch mode (``run.evaluate_many``) each generation is one batch.
    """
    from expertkit.merge.zoo.cmaes import cmaes_minimize

    method = "task_arithmetic" if has_base else "linear"
    params, bounds, start, step = CMAES_SPACE[method]
    weights: dict[str, float] | None = None
    if run.left > 0:
        def objective(x: Any) -> float:
            s = score(method, pool, params, "cmaes", [round(float(v), 6) for v in x])
            return -s if s is not None else float("inf")

        def objective_many(xs: list[Any]) -> list[float]:
            got = score_many([(method, pool, params, "cmaes", [round(float(v), 6) for v in x]) for x in xs])
            return [-s if s is not None else float("inf") for s in got]

        batched = run.evaluate_many is not None
        res = cmaes_minimize(None if batched else objective, [start] * len(pool), step, budget=run.left,
                             bounds=bounds, seed=seed, f_many=objective_many if batched else None)
        if -res.fx > chosen[3]:
            chosen = (method, pool, dict(params), -res.fx)
            weights = {m: round(float(v), 6) for m, v in zip(pool, res.x, strict=True)}
    return Selection(chosen[1], chosen[0], chosen[2], chosen[3], individual, trials, run.used, weights)
