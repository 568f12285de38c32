"""The budget solver hits its target exactly; typed policies give the bits they promise; bad configs fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertkit.config import validate
from expertkit.errors import ConfigError
from expertkit.quant.budget import Format, Unit, allocation, solve_budget
from expertkit.quant.config import QuantizeConfig
from expertkit.quant.policy import PolicyContext, fixed_bits, scores
from expertkit.quant.scorers import BlockImportance, outlier_score, rank_scores
from expertkit.quant.targets import Target


def _units(seed: int, n: int = 40) -> list[Unit]:
    rng = np.random.default_rng(seed)
    return [Unit(f"u{i}", int(rng.integers(1, 9)) * 32, int(rng.choice([64, 128, 192])), float(rng.uniform(0.5, 4)))
            for i in range(n)]


@pytest.mark.parametrize("target", [2.5, 3.0, 3.37, 3.5, 4.0])
@pytest.mark.parametrize("fmt", [Format(32, True), Format(64, False), Format(-1, True)])
def test_the_solver_hits_the_target_counting_scales_and_zero_points(target, fmt):
    units = _units(int(target * 100))
    alloc = solve_budget(units, (2, 3, 4, 5), target, fmt)
    exact = sum(fmt.bits(u, alloc.bits[u.name]) for u in units) / sum(u.rows * u.cols for u in units)
    assert alloc.achieved == pytest.approx(exact, abs=0)  # the report is the exact count
    assert alloc.achieved <= target
    # hit: no single unit could take one more width without exceeding the budget
    budget = target * alloc.weights
    for u in units:
        b = alloc.bits[u.name]
        if b < 5:
            assert alloc.total_bits - fmt.bits(u, b) + fmt.bits(u, b + 1) > budget
    assert target - alloc.achieved < max(fmt.bits(u, 3) - fmt.bits(u, 2) for u in units) / alloc.weights
    if fmt == Format(32, True) and target != 3.37:  # the exact search lands on the budget, to the finest step the costs allow
        step = int(np.gcd.reduce([fmt.bits(u, b) for u in units for b in (2, 3, 4, 5)]))
        assert alloc.total_bits == int(target * alloc.weights) // step * step


def test_the_solver_gives_the_extra_bits_to_the_higher_priority_by_hand():
    fmt = Format(32, True, "float16")  # 0.5 bits of scale per weight
    units = [Unit("a", 32, 64, priority=1.0), Unit("b", 32, 64, priority=16.0), Unit("c", 64, 64, priority=1.0)]
    # 8192 weights at 3.0 + 0.5 = 3.5 bits each is 28672; a and b at 2 + c at 4 plus scales is the same budget.
    alloc = solve_budget(units, (2, 3, 4), 3.5, fmt)
    assert alloc.bits == {"a": 2, "b": 4, "c": 3} and alloc.achieved == 3.5  # noise 16*4^-2 beats 4^-2 twice
    assert alloc.code_bits == 3.0 and alloc.per_width == {2: 2048, 3: 4096, 4: 2048}


def test_a_budget_the_choices_cannot_meet_is_one_clear_error():
    units = _units(1)
    with pytest.raises(ConfigError, match=r"cannot meet a budget of 2\.2 bits per weight: its choices \[3, 4\] need at least 3\.5"):
        solve_budget(units, (3, 4), 2.2, Format(32, True))
    with pytest.raises(ConfigError, match=r"more than the choices \[2, 3\] can use \(at most 3\.5000\)"):
        solve_budget(units, (2, 3), 3.9, Format(32, True))
    with pytest.raises(ConfigError, match="9 bits is not a weight precision"):
        solve_budget(units, (2, 9), 3.0, Format(32, True))


def _cfg(**policy):
    return validate(QuantizeConfig, {"policy": policy}, source="q.yaml")


@pytest.mark.parametrize(("policy", "message"), [
    ({"kind": "uniform", "bits": 0}, "policy.uniform.bits: 0 bits is not a weight precision"),
    ({"kind": "uniform", "bits": 9}, "policy.uniform.bits: 9 bits is not a weight precision"),
    ({"kind": "rules", "default": 4, "rules": [{"group": "attention", "bits": 9}]}, "9 bits is not a weight precision"),
    ({"kind": "block", "target_bits": 3, "favour": ["attenton"]}, "policy.block.favour[0]: Input should be 'attention'"),
    ({"kind": "rules", "rules": [{"group": "router", "bits": 4}]}, "Input should be 'attention', 'mlp', 'expert' or"),
    ({"kind": "blocks", "target_bits": 3}, "does not match any of the expected tags: 'uniform', 'rules', 'block'"),
    ({"kind": "linear_kind", "target_bits": 3, "favour": "up"}, "Input should be 'down' or 'gate_up'"),
    ({"kind": "outlier", "target_bits": 3, "choice": [2, 4]}, "unknown key 'choice'. Did you mean 'choices'?"),
])
def test_bad_policies_get_one_clear_error_each(policy, message):
    with pytest.raises(ConfigError) as err:
        _cfg(**policy)
    assert message in str(err.value) and str(err.value).startswith("q.yaml: 1 problem:")


def test_unknown_calibration_task_and_bad_group_size_are_errors():
    with pytest.raises(ConfigError, match="unknown task 'add_subb'. Did you mean 'add_sub'"):
        validate(QuantizeConfig, {"calibration": {"tasks": ["add_subb"]}})
    with pytest.raises(ConfigError, match="group_size must be a positive number of columns or -1"):
        validate(QuantizeConfig, {"group_size": 0})


def _t(name: str, group: str, layer: int, kind: str, expert: int | None = None) -> Target:
    return Target(name, name, group, None, layer, expert, name, kind, 8, 8, name)


TARGETS = [_t("q0", "attention", 0, "attention"), _t("up0", "mlp", 0, "gate_up"), _t("down0", "mlp", 0, "down"),
           _t("q1", "attention", 1, "attention"), _t("e0", "expert", 1, "gate_up", 0),
           _t("e1", "expert", 1, "gate_up", 1), _t("e2", "expert", 1, "down", 2)]


def test_structure_policies_score_their_structures():
    block = QuantizeConfig.model_validate({"policy": {"kind": "block", "target_bits": 3}}).policy
    assert scores(block, TARGETS, PolicyContext()) == {"q0": 1, "up0": 0, "down0": 0, "q1": 1, "e0": 0, "e1": 0, "e2": 0}
    kind = QuantizeConfig.model_validate({"policy": {"kind": "linear_kind", "target_bits": 3}}).policy
    assert scores(kind, TARGETS, PolicyContext()) == {"q0": 0.5, "up0": 0, "down0": 1, "q1": 0.5, "e0": 0, "e1": 0, "e2": 1}
    last = QuantizeConfig.model_validate({"policy": {"kind": "layer_position", "target_bits": 3, "favour": "last",
                                                     "k": 1}}).policy
    assert [scores(last, TARGETS, PolicyContext())[t.name] for t in TARGETS] == [0, 0, 0, 1, 1, 1, 1]
    freq = QuantizeConfig.model_validate({"policy": {"kind": "expert_frequency", "target_bits": 3}}).policy
    ctx = PolicyContext(frequencies={(None, 1): np.array([0.2, 0.7, 0.1])})
    assert scores(freq, TARGETS, ctx) == {"q0": 0.5, "up0": 0.5, "down0": 0.5, "q1": 0.5, "e0": 0.5, "e1": 1.0, "e2": 0.0}
    rules = QuantizeConfig.model_validate({"policy": {"kind": "rules", "default": 3, "rules": [
        {"group": "attention", "bits": 4}, {"kind": "down", "layers": [1], "bits": 8}, {"name": "e.", "bits": 2}]}}).policy
    assert fixed_bits(rules, TARGETS) == {"q0": 4, "up0": 3, "down0": 3, "q1": 4, "e0": 2, "e1": 2, "e2": 8}


def test_outlier_score_and_block_importance_known_answers():
    w = torch.tensor([[4.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # column 0: max 4 / mean 1 = 4; column 1: 1
    assert outlier_score(w) == 4.0 and outlier_score(torch.zeros(3, 3)) == 0.0
    assert rank_scores({"a": 3.0, "b": 1.0, "c": 3.0, "d": 2.0}) == {"a": 5 / 6, "b": 0.0, "c": 5 / 6, "d": 1 / 3}

    class Fn(torch.nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    toy = torch.nn.ModuleDict({"same": Fn(lambda x: x), "flip": Fn(lambda x: -x),  # cosines 1 and -1
                               "part": Fn(lambda x: torch.cat([x[..., :2], torch.zeros_like(x[..., 2:])], -1))})
    obs = BlockImportance({(None, 0): "same", (None, 1): "flip", (None, 2): "part"}, per_batch=1000)
    handles = obs.attach(toy)
    x = torch.zeros(50, 4)
    x[:, 0], x[:, 2] = 1.0, 1.0  # cos(x, part(x)) = 1 / sqrt(2)
    for block in toy.values():
        block(x)
    for h in handles:
        h.remove()
    imp, _ = obs.importance(predicted=False)
    assert imp[(None, 0)] == pytest.approx(0.0, abs=1e-6) and imp[(None, 1)] == pytest.approx(2.0)
    assert imp[(None, 2)] == pytest.approx(1 - 2 ** -0.5)


def test_allocation_of_a_fixed_assignment_is_counted_exactly():
    units = [Unit("a", 8, 64), Unit("b", 8, 64)]
    alloc = allocation(units, {"a": 4, "b": 16}, Format(32, True))
    assert alloc.total_bits == 8 * 64 * 4 + 8 * 2 * 16 + 8 * 64 * 16
    assert alloc.achieved == alloc.total_bits / 1024 and alloc.target is None


def test_a_budget_whose_only_choice_keeps_16_bits_keeps_every_matrix():
    units = [Unit("a", 32, 64), Unit("b", 64, 64)]
    alloc = solve_budget(units, (16,), 16.0, Format(32, True))
    assert alloc.bits == {"a": 16, "b": 16}
