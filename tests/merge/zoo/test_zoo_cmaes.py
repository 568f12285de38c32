"""The CMA-ES coefficient search (an adapter over `cma`): known minima (free and on the bounds), the
budget as a hard cap, seeding, and its use in per-cluster strategy selection and `expertkit zoo plan --search cmaes`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.merge.zoo import select_strategy
from expertkit.merge.zoo.cmaes import cmaes_minimize
from expertkit.merge.zoo.plan import load_plan

CENTRE = np.array([0.3, -1.2, 2.0, 0.7])
SCALES = np.array([1.0, 10.0, 100.0, 0.5])  # an ellipsoid, condition number 200


def ellipsoid(calls):
    def f(x):
        calls.append(np.array(x))
        return float(((np.asarray(x) - CENTRE) ** 2 * SCALES).sum())

    return f


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmaes_finds_the_minimum_of_a_quadratic_within_the_budget(seed):
    calls = []
    res = cmaes_minimize(ellipsoid(calls), [0.0] * 4, 0.5, budget=800, seed=seed)
    assert res.evaluations == len(calls) <= 800
    np.testing.assert_allclose(res.x, CENTRE, atol=5e-3)
    assert res.fx == min(v for _, v in res.history) < 1e-4


def test_cmaes_finds_an_interior_minimum_inside_bounds():
    centre = np.array([0.3, 0.2, 0.6])
    res = cmaes_minimize(lambda x: float(((x - centre) ** 2).sum()), [0.5] * 3, 0.2, budget=400,
                         bounds=(0.0, 1.0), seed=0)
    np.testing.assert_allclose(res.x, centre, atol=1e-3)
    assert all(0.0 <= v <= 1.0 for x, _ in res.history for v in x)  # never evaluated outside the box


@pytest.mark.parametrize("budget", [1, 3, 8, 13, 37])
def test_cmaes_never_exceeds_its_budget(budget):
    calls = []
    res = cmaes_minimize(ellipsoid(calls), [5.0] * 4, 0.1, budget=budget, seed=0)  # far away: no early stop
    assert len(calls) == res.evaluations == len(res.history) == budget
    assert res.stop == "budget"
    assert res.generations == -(-budget // 8)  # lambda = 4 + floor(3 ln 4) = 8; the last one cut short
    best = min(range(budget), key=lambda i: res.history[i][1])
    assert res.fx == res.history[best][1] and res.x.tolist() == res.history[best][0]  # best so far


def test_cmaes_spends_the_whole_budget_on_flat_values():
    # accuracy-like plateaus: cma's default tolfun / tolflatfitness stops would end this after a few
    # generations; the adapter turns them off, so every evaluation the caller allowed is made
    calls = []

    def plateau(x):
        calls.append(1)
        return float(np.round(np.abs(np.asarray(x) - 0.6).mean(), 1))

    res = cmaes_minimize(plateau, [0.5] * 3, 0.3, budget=150, bounds=(0.0, 1.5), seed=1)
    assert len(calls) == res.evaluations == 150 and res.stop == "budget"
    assert res.fx == 0.0


def test_cmaes_finds_a_minimum_on_the_bounds_and_stops_at_a_target():
    c = np.array([-0.5, 0.3, 2.0])  # box optimum (0, 0.3, 1): two coordinates on a bound
    res = cmaes_minimize(lambda x: float(((x - c) ** 2).sum()), [0.5] * 3, 0.2, budget=400, bounds=(0.0, 1.0),
                         seed=0)
    np.testing.assert_allclose(res.x, [0.0, 0.3, 1.0], atol=1e-3)
    assert all(0.0 <= v <= 1.0 for x, _ in res.history for v in x)
    opt = 0.25 + 1.0  # f at the box optimum
    res = cmaes_minimize(lambda x: float(((x - c) ** 2).sum()), [0.5] * 3, 0.2, budget=400, bounds=(0.0, 1.0),
                         seed=0, ftarget=opt + 1e-2)
    assert res.stop == "ftarget" and res.fx <= opt + 1e-2 and res.evaluations < 400
    assert res.evaluations % 7 == 0  # stopped at the end of a generation (lambda = 4 + floor(3 ln 3) = 7)


def test_cmaes_is_seeded_and_checks_its_arguments():
    a = cmaes_minimize(ellipsoid([]), [0.0] * 4, 0.5, budget=50, seed=3)
    b = cmaes_minimize(ellipsoid([]), [0.0] * 4, 0.5, budget=50, seed=3)
    assert a.history == b.history
    assert cmaes_minimize(ellipsoid([]), [0.0] * 4, 0.5, budget=50, seed=4).history != a.history
    np.random.seed(11)
    expected = np.random.rand(3)
    np.random.seed(11)
    z0 = cmaes_minimize(ellipsoid([]), [0.0] * 4, 0.5, budget=20, seed=0)  # cma itself reads seed 0 as "clock"
    np.testing.assert_array_equal(np.random.rand(3), expected)  # the caller's global generator is untouched
    assert z0.history == cmaes_minimize(ellipsoid([]), [0.0] * 4, 0.5, budget=20, seed=0).history  # nor steers it
    for kwargs in ({"budget": 0}, {"budget": 5, "bounds": (1.0, 1.0)}):
        with pytest.raises(ConfigError):
            cmaes_minimize(ellipsoid([]), [0.0], 0.5, **kwargs)
    with pytest.raises(ConfigError, match="sigma0"):
        cmaes_minimize(ellipsoid([]), [0.0], 0.0, budget=5)
    with pytest.raises(ConfigError, match="one coordinate"):
        cmaes_minimize(ellipsoid([]), [], 0.5, budget=5)


W = "w"
MODELS = {f"m{i}": {W: torch.eye(3)[i]} for i in range(3)}


def test_select_strategy_cmaes_finds_per_member_task_arithmetic_weights():
    target = torch.tensor([0.2, 0.9, 0.4])  # = 0.2 m0 + 0.9 m1 + 0.4 m2 over a zero base
    calls = []

    def evaluate(tensors):
        calls.append(1)
        return -float((tensors[W] - target).norm())

    sel = select_strategy(MODELS, evaluate, base={W: torch.zeros(3)}, budget=150, search="cmaes", greedy=False)
    assert sel.method == "task_arithmetic" and sel.params == {"lambda": 1.0}
    assert sorted(sel.members) == ["m0", "m1", "m2"]
    assert len(calls) == sel.evaluations <= 150
    got = torch.tensor([sel.weights[m] for m in sel.members])
    order = torch.tensor([int(m[1]) for m in sel.members])
    torch.testing.assert_close(got, target[order], atol=0.03, rtol=0)
    assert sel.score > -0.05
    assert any(t.note == "cmaes" and t.weights is not None for t in sel.trials)


def test_select_strategy_cmaes_without_a_base_weights_a_linear_merge():
    target = torch.tensor([0.5, 0.25, 0.25])  # normalised weights 2:1:1

    def evaluate(tensors):
        return -float((tensors[W] - target).norm())

    sel = select_strategy(MODELS, evaluate, budget=120, search="cmaes", greedy=False)
    assert sel.method == "linear" and sel.weights is not None
    w = torch.tensor([sel.weights[f"m{i}"] for i in range(3)])
    torch.testing.assert_close(w / w.sum(), target, atol=0.03, rtol=0)
    with pytest.raises(ConfigError, match="unknown coefficient search 'cma'"):
        select_strategy(MODELS, evaluate, budget=10, search="cma")


def test_cli_zoo_plan_with_cmaes_search_records_it_and_stays_in_budget(tiny_zoo, tmp_path, cli):
    plan_path = tmp_path / "plan.yaml"
    code, out, err = cli(["--quiet", "zoo", "plan", str(tiny_zoo["a0"]), str(tiny_zoo["a1"]), str(tiny_zoo["b0"]),
                           "-t", "family_relation", "--n", "2", "--budget", "7", "--mixture", "none",
                           "--search", "cmaes", "--out", str(plan_path)])
    assert code == 0, err
    plan = load_plan(plan_path)
    assert plan.validation.search == "cmaes"
    trials = plan.clusters[0].trials
    assert sum(1 for t in trials if "skipped" not in t) <= 7  # 2 individual + 1 greedy + at most 4 CMA-ES
    assert any(t.endswith("[cmaes]") for t in trials)
    code, _, err = cli(["zoo", "plan", str(tiny_zoo["a0"]), "-t", "family_relation", "--search", "random"])
    assert code == 2 and "cmaes" in err
