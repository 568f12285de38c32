"""Batch evaluation of the planner's candidates gives exactly the one-by-one results.

A deterministic evaluator with plateaus (ties decide the winner) scores the candidates of
``select_strategy`` one by one and in batches; the selections (trials, budget, memo, winner,
weights), the evaluated tensors and their order must be identical, and the batches must be the
independent groups (members, grid, CMA-ES generations) cut at the budget.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.merge.zoo import select_strategy
from expertkit.merge.zoo.cmaes import cmaes_minimize
from expertkit.merge.zoo.select import BatchEvaluator

W = "w"
MODELS = {
    "m0": {W: torch.tensor([1.0, 0.0, 0.0, 0.5])},
    "m1": {W: torch.tensor([0.0, 1.0, 0.0, 0.5])},
    "m2": {W: torch.tensor([0.0, 0.2, 1.0, 0.5])},
}
BASE = {W: torch.zeros(4)}
TARGET = torch.tensor([0.6, 0.8, 0.3, 0.9])


def plateau(tensors) -> float:
    """Minus the distance to TARGET in steps of 0.25: many candidates tie."""
    return -float(torch.round((tensors[W] - TARGET).norm() * 4) / 4)


class Recorder:
    """One-by-one (``__call__``) and batch (``many``) scoring that record what they were given."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []
        self.batches: list[int] = []

    def __call__(self, tensors) -> float:
        self.calls.append(tensors[W].clone())
        return plateau(tensors)

    def many(self, candidates) -> list[float]:
        got = [self(t) for t in candidates]
        self.batches.append(len(got))
        return got


def both(**kw):
    """(one-by-one selection, its recorder, batch selection, its recorder) with the same settings."""
    one, batch = Recorder(), Recorder()
    a = select_strategy(MODELS, one, **kw)
    b = select_strategy(MODELS, batch, evaluate_many=batch.many, **kw)
    assert isinstance(batch, BatchEvaluator)
    return a, one, b, batch


def same_calls(one: Recorder, batch: Recorder) -> None:
    assert len(one.calls) == len(batch.calls)
    for x, y in zip(one.calls, batch.calls, strict=True):
        assert torch.equal(x, y)


def test_grid_batches_are_cut_at_the_budget_exactly_as_one_by_one():
    # 3 members + 2 greedy steps + 3 grid candidates = budget 8; the grid's first candidate (linear
    # of the kept m1, m0) is the greedy step's, memoised: free, and not in the grid's batch
    a, one, b, batch = both(base=BASE, budget=8)
    assert a == b
    same_calls(one, batch)
    assert a.evaluations == 8 == len(one.calls)
    assert batch.batches == [3, 1, 1, 3]  # members, greedy, greedy, the grid cut at the budget
    notes = [t.note for t in a.trials]
    assert notes == ["individual"] * 3 + ["greedy: add m0", "greedy: add m2"] + ["grid"] * 4 + ["skipped: budget"] * 3
    assert a.trials[5].score == a.trials[3].score == -0.5
    # task arithmetic ties the greedy linear merge at -0.5: the earlier candidate wins
    assert (a.method, a.members, a.score) == ("linear", ["m1", "m0"], -0.5)
    assert a.trials[6].method == "task_arithmetic" and a.trials[6].score == -0.5


def test_without_a_base_or_greedy_the_skips_and_memo_match():
    grid = (("linear", {}), ("ties", {"density": 0.5, "lambda": 1.0}), ("linear", {}),
            ("task_arithmetic", {"lambda": 0.5}))
    a, one, b, batch = both(base=None, budget=5, greedy=False, grid=grid)
    assert a == b
    same_calls(one, batch)
    assert batch.batches == [3, 1]  # greedy off; the grid's one runnable new candidate (linear, then its repeat)
    assert [t.note for t in a.trials[3:]] == ["grid", "skipped: needs the cluster's base", "grid",
                                             "skipped: needs the cluster's base"]
    assert a.trials[3].score == a.trials[5].score and a.evaluations == 4


@pytest.mark.parametrize(("base", "budget", "batches", "method"), [
    (BASE, 14, [3, 1, 1, 6, 3], "task_arithmetic"),  # CMA-ES wins with its weights
    (None, 19, [3, 1, 1, 6, 6, 2], "linear"),  # nothing beats the greedy merge: no weights
])
def test_cmaes_generations_are_batches_with_the_one_by_one_result(base, budget, batches, method):
    # greedy keeps m1, m0: 2 weights, lambda = 6; the budget left after 3 + 2 ends in a cut generation
    a, one, b, batch = both(base=base, budget=budget, search="cmaes")
    assert a == b and a.weights == b.weights
    same_calls(one, batch)
    assert a.evaluations == len(one.calls) == budget
    assert batch.batches == batches
    assert [t.note for t in a.trials].count("cmaes") == budget - 5
    assert a.method == method and (a.weights is not None) == (method == "task_arithmetic")


def test_cmaes_minimize_batch_objective_repeats_the_sequential_search():
    def f(x):
        return float(np.round(((x - 0.3) ** 2).sum() * 20) / 20)  # plateaus

    batches = []

    def f_many(xs):
        batches.append(len(xs))
        return [f(x) for x in xs]

    for kw in ({"budget": 30}, {"budget": 200, "ftarget": 0.05}):
        a = cmaes_minimize(f, [1.0, -1.0, 0.5], 0.4, bounds=(-2, 2), seed=3, **kw)
        batches.clear()
        b = cmaes_minimize(None, [1.0, -1.0, 0.5], 0.4, bounds=(-2, 2), seed=3, f_many=f_many, **kw)
        assert a.history == b.history and a.fx == b.fx and np.array_equal(a.x, b.x)
        assert (a.evaluations, a.generations, a.sigma, a.stop) == (b.evaluations, b.generations, b.sigma, b.stop)
        assert sum(batches) == b.evaluations and set(batches[:-1]) == {7}
    assert b.stop == "ftarget"
    with pytest.raises(ConfigError, match="exactly one objective"):
        cmaes_minimize(f, [0.0], 0.1, budget=3, f_many=f_many)
    with pytest.raises(ConfigError, match="exactly one objective"):
        cmaes_minimize(None, [0.0], 0.1, budget=3)
    with pytest.raises(ConfigError, match="returned 1 values for 7 points"):
        cmaes_minimize(None, [0.0, 0.0, 0.0], 0.1, budget=9, f_many=lambda xs: [0.0])


def test_a_batch_evaluator_returning_the_wrong_number_of_scores_is_refused():
    with pytest.raises(ConfigError, match="returned 2 scores for 3 candidates"):
        select_strategy(MODELS, plateau, budget=5, evaluate_many=lambda cands: [0.0, 0.0])
