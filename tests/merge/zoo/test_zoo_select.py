"""Per-cluster strategy selection with synthetic evaluators whose best choice is known."""

from __future__ import annotations

import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.merge.zoo import merge_members, select_strategy

W = "w"


def stand_in_merge(method, models, base, *, weights=None, params=None, seed=0):
    """A local stand-in for merge_state_dicts: linear mean and task arithmetic only."""
    params = params or {}
    xs = torch.stack([m[W] for m in models])  # (n, d)
    if method == "linear":
        return {W: xs.mean(0)}
    if method == "task_arithmetic":
        return {W: base[W] + params["lambda"] * (xs - base[W]).sum(0)}
    raise ConfigError(f"stand-in has no {method}")


def distance_evaluator(target, calls):
    def evaluate(tensors):
        calls.append(tensors[W].clone())
        return -float((tensors[W] - target).norm())

    return evaluate


MODELS = {
    "m0": {W: torch.tensor([1.0, 0.0, 0.0])},
    "m1": {W: torch.tensor([0.0, 1.0, 0.0])},
    "m2": {W: torch.tensor([0.0, 0.0, 1.0])},
}
BASE = {W: torch.zeros(3)}
GRID = (("linear", {}), ("task_arithmetic", {"lambda": 1.0}), ("task_arithmetic", {"lambda": 0.5}))


def test_task_arithmetic_wins_when_the_target_is_the_sum_of_task_vectors():
    calls = []
    sel = select_strategy(MODELS, distance_evaluator(torch.ones(3), calls), base=BASE, budget=20, grid=GRID,
                          merge=stand_in_merge)
    assert sel.method == "task_arithmetic" and sel.params == {"lambda": 1.0}
    assert sel.members == ["m0", "m1", "m2"]
    assert sel.score == pytest.approx(0.0)
    assert sel.evaluations == len(calls)  # memoised: the greedy and grid 'linear' of all three are one call


def test_greedy_leaves_out_a_model_that_makes_the_average_worse():
    models = dict(MODELS, bad={W: torch.tensor([-9.0, -9.0, -9.0])})
    target = torch.tensor([1.0, 1.0, 0.0]) / 2  # the mean of m0 and m1
    sel = select_strategy(models, distance_evaluator(target, []), base=BASE, budget=20,
                          grid=(("linear", {}),), merge=stand_in_merge)
    assert sel.method == "linear"
    assert sel.members == ["m0", "m1"]
    kept_notes = [t.note for t in sel.trials if t.note.startswith("greedy")]
    assert kept_notes == ["greedy: add m1", "greedy: add m2", "greedy: add bad"]


def test_single_model_kept_when_no_merge_beats_it():
    target = torch.tensor([1.0, 0.0, 0.0])
    sel = select_strategy(MODELS, distance_evaluator(target, []), base=BASE, budget=20, grid=GRID,
                          merge=stand_in_merge)
    assert (sel.method, sel.members, sel.score) == ("single", ["m0"], 0.0)


def test_budget_caps_evaluations_and_records_skipped_candidates():
    calls = []
    sel = select_strategy(MODELS, distance_evaluator(torch.ones(3), calls), base=BASE, budget=4, grid=GRID,
                          merge=stand_in_merge)
    assert len(calls) == 4 == sel.evaluations
    assert any(t.score is None and t.note == "skipped: budget" for t in sel.trials)
    with pytest.raises(ConfigError, match="below the cluster size"):
        select_strategy(MODELS, distance_evaluator(torch.ones(3), []), budget=2, merge=stand_in_merge)


def test_task_vector_methods_are_skipped_without_a_base():
    sel = select_strategy(MODELS, distance_evaluator(torch.ones(3), []), base=None, budget=20, grid=GRID,
                          merge=stand_in_merge)
    assert sel.method in ("single", "linear")
    assert [t.note for t in sel.trials if t.method == "task_arithmetic"] == ["skipped: needs the cluster's base"] * 2


def test_real_merge_engine_gives_the_known_task_arithmetic_and_ties_results():
    merged = merge_members("task_arithmetic", ["m0", "m1", "m2"], MODELS, BASE, {"lambda": 1.0})
    torch.testing.assert_close(merged[W], torch.ones(3))
    sel = select_strategy(MODELS, distance_evaluator(torch.ones(3), []), base=BASE, budget=20)
    assert sel.score == pytest.approx(0.0)
    assert sel.method == "task_arithmetic"  # the first candidate that reaches the target wins the tie
    assert merge_members("single", ["m1"], MODELS, None, {}) == MODELS["m1"]
