"""The scheduler's choices against hand-computed costs, and the cost formulas at known points."""

from __future__ import annotations

import math

import pytest

from expertkit.errors import ConfigError
from expertkit.optim.newton import NewtonParams
from expertkit.optim.newton.costs import (
    cg_iterations,
    cholesky_flops,
    costa_queries,
    gates_per_query,
    jennings_queries,
    quantum_cost,
    tomography_shots,
)
from expertkit.optim.newton.scheduler import Scheduler, System

# n = 100, κ = 10, ε = 1e-3, d = 5, α = 1, flop rate 1e6 flop/s, by hand:
#   Cholesky: 100³/3 + 2·100² = 353,333.3 flops -> 0.35333 s
#   CG: ceil(½·√10·ln 2000) = ceil(12.018) = 13 iterations x (2·10,000 + 10·100) flops = 273,000 -> 0.273 s
#   Costa (c_walk 2305): 2305·10 + 10·ln 2000 = 23,126.009 queries x ceil(log2 100) = 7 gates x t_gate
SYSTEM = System("blk", 100, True, 10.0, 10.0, 5, 1.0, 10_000)


def _sched(quantum: bool, gate_time: float, **kw) -> Scheduler:
    hp = NewtonParams(quantum_model="costa", gate_time=gate_time, flop_rate=1e6, eps=1e-3, verbose=False, **kw)
    return Scheduler(hp, quantum=quantum, flop_rate=hp.flop_rate)


def test_hand_computed_costs() -> None:
    assert cholesky_flops(100) == pytest.approx(353_333.333, rel=1e-9)
    assert cg_iterations(10.0, 1e-3) == 13
    assert costa_queries(1.0, 10.0, 1e-3) == pytest.approx(23_126.009, rel=1e-7)
    assert gates_per_query(100) == 7 and gates_per_query(1) == 1
    assert jennings_queries(1.0, 10.0, 1e-3) == pytest.approx(6133.2156, rel=1e-6)
    assert tomography_shots(100, 0.1) == math.ceil(36 * 100 * math.log(100) / 0.01)


def test_scheduler_picks_the_quantum_model_when_it_is_predicted_cheaper() -> None:
    dec = _sched(True, 1e-6).decide(SYSTEM, step=0)
    assert dec.predicted_s["cholesky"] == pytest.approx(0.353333, rel=1e-5)
    assert dec.predicted_s["cg"] == pytest.approx(0.273, rel=1e-9)
    assert dec.predicted_s["quantum"] == pytest.approx(0.16188206, rel=1e-6)
    assert dec.chosen == "quantum" and "ran classically" in dec.reason


def test_scheduler_picks_cg_when_the_gate_is_slower() -> None:
    dec = _sched(True, 2e-6).decide(SYSTEM, step=0)  # quantum 0.32376 s > CG 0.273 s
    assert dec.predicted_s["quantum"] == pytest.approx(0.32376413, rel=1e-6)
    assert dec.chosen == "cg"


def test_classical_newton_never_picks_quantum_but_logs_its_cost() -> None:
    dec = _sched(False, 1e-12).decide(SYSTEM, step=0)
    assert dec.chosen == "cg" and dec.predicted_s["quantum"] < 1e-6


def test_readout_and_state_preparation_are_charged_when_asked() -> None:
    dec = _sched(True, 1e-6, readout=True, state_prep=True, readout_tol=0.1).decide(SYSTEM, step=0)
    shots = tomography_shots(100, 0.1)
    expected = shots * (0.16188206 + 200 * 1e-6)
    assert dec.predicted_s["quantum"] == pytest.approx(expected, rel=1e-6)
    assert dec.chosen == "cg"  # reading the state out costs far more than any classical solve


def test_kappa_max_keeps_ill_conditioned_systems_classical() -> None:
    dec = _sched(True, 1e-9, kappa_max=5.0).decide(SYSTEM, step=0)
    assert dec.chosen == "cg" and "kappa_max" in dec.reason


def test_measured_times_drive_the_choice_when_asked() -> None:
    s = _sched(False, 1e-6, classical_cost="measured")
    s.record("blk", "cholesky", 0.01)
    dec = s.decide(SYSTEM, step=1)
    assert dec.measured_model_s == {"cholesky": 0.01} and dec.chosen == "cholesky" and "measured" in dec.reason
    assert _sched(False, 1e-6).decide(SYSTEM, step=1).chosen == "cg"  # the flop model alone says CG


def test_bad_cost_model_inputs_are_refused() -> None:
    with pytest.raises(ConfigError, match="quantum cost model"):
        quantum_cost(10, 2.0, 2, 1.0, eps=1e-3, model="hhl")
    with pytest.raises(ConfigError, match="tolerance"):
        quantum_cost(10, 2.0, 2, 1.0, eps=2.0)


def test_a_matrix_free_block_charges_each_oracle_query_one_operator_product() -> None:
    # n = 100, κ = 10, matrix-free (products of 0.01 s each): CG 13 iterations x (0.01 + 10·100/1e6) = 0.143 s;
    # Costa: 23,126.009 queries x (7 gates x 1e-18 s + 0.01 s per row) = 231.26 s with rows charged,
    # 23,126.009 x 7e-18 = 1.6188e-13 s with gates only.
    free = System("blk", 100, False, 10.0, 10.0, 100, 1.0, 10_000, 0.01)
    row = _sched(True, 1e-18).decide(free, step=0)
    assert row.predicted_s["cg"] == pytest.approx(0.143, rel=1e-9)
    assert row.predicted_s["quantum"] == pytest.approx(231.26009, rel=1e-6)
    assert row.chosen == "cg" and row.quantum_detail["query_s"] == 0.01
    gate = _sched(True, 1e-18, oracle_cost="gate").decide(free, step=0)
    assert gate.predicted_s["quantum"] == pytest.approx(1.6188206e-13, rel=1e-6) and gate.chosen == "quantum"
    stored = _sched(True, 1e-18).decide(SYSTEM, step=0)  # a stored matrix's rows are read, not computed
    assert stored.quantum_detail["query_s"] == 0.0 and stored.predicted_s["quantum"] == pytest.approx(1.6188206e-13,
                                                                                                      rel=1e-6)
    with pytest.raises(ConfigError, match="negative"):
        quantum_cost(100, 10.0, 5, 1.0, eps=1e-3, query_s=-1.0)
