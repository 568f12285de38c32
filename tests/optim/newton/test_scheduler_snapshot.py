"""Snapshot of Q-Newton's scheduler decision table: fixed systems (size, condition number, sparsity) x cost
models x gate times -> the solver chosen and the predicted seconds of every candidate.

A change in the cost model (a formula, a constant, the gates per query, the flop counts) or in the
choice rule changes a row here; update the table only together with docs/newton.md's numbers and say
why in the commit. Inputs: flop rate 1e9 flop/s, ε = 1e-3 (default), α = d / 4 (clamped by the cost
model to [1, d]), dense blocks up to n = 512 (Cholesky or CG), a matrix-free operator at n = 8192 (CG
with 10 µs per product, no Cholesky).
"""

from __future__ import annotations

import math

import pytest

from expertkit.optim.newton import NewtonParams
from expertkit.optim.newton.scheduler import Scheduler, System

# (quantum model, gate time s, n, κ, row sparsity d, chosen, predicted s: cholesky, cg, quantum)
TABLE = [
    ("qnewton", 1e-06, 16, 2, 2, "cholesky", 1.87733e-06, 4.032e-06, 0.00619867),
    ("qnewton", 1e-06, 16, 2, 16, "cholesky", 1.87733e-06, 4.032e-06, 0.0489312),
    ("qnewton", 1e-06, 16, 10000, 2, "cholesky", 1.87733e-06, 1.0752e-05, 34.5455),
    ("qnewton", 1e-06, 16, 10000, 16, "cholesky", 1.87733e-06, 1.0752e-05, 551.15),
    ("qnewton", 1e-06, 512, 2, 2, "cg", 0.0452635, 0.00317645, 0.013947),
    ("qnewton", 1e-06, 512, 2, 64, "cg", 0.0452635, 0.00317645, 1.3093),
    ("qnewton", 1e-06, 512, 10000, 2, "cholesky", 0.0452635, 0.201704, 77.7273),
    ("qnewton", 1e-06, 512, 10000, 64, "cholesky", 0.0452635, 0.201704, 19827.2),
    ("qnewton", 1e-06, 8192, 2, 2, "cg", None, 0.00055152, 0.0201457),
    ("qnewton", 1e-06, 8192, 2, 64, "cg", None, 0.00055152, 1.89121),
    ("qnewton", 1e-06, 8192, 10000, 2, "cg", None, 0.0350215, 112.273),
    ("qnewton", 1e-06, 8192, 10000, 64, "cg", None, 0.0350215, 28639.3),
    ("qnewton", 1e-10, 16, 2, 2, "quantum", 1.87733e-06, 4.032e-06, 6.19867e-07),
    ("qnewton", 1e-10, 16, 2, 16, "cholesky", 1.87733e-06, 4.032e-06, 4.89312e-06),
    ("qnewton", 1e-10, 16, 10000, 2, "cholesky", 1.87733e-06, 1.0752e-05, 0.00345455),
    ("qnewton", 1e-10, 16, 10000, 16, "cholesky", 1.87733e-06, 1.0752e-05, 0.055115),
    ("qnewton", 1e-10, 512, 2, 2, "quantum", 0.0452635, 0.00317645, 1.3947e-06),
    ("qnewton", 1e-10, 512, 2, 64, "quantum", 0.0452635, 0.00317645, 0.00013093),
    ("qnewton", 1e-10, 512, 10000, 2, "quantum", 0.0452635, 0.201704, 0.00777273),
    ("qnewton", 1e-10, 512, 10000, 64, "cholesky", 0.0452635, 0.201704, 1.98272),
    ("qnewton", 1e-10, 8192, 2, 2, "quantum", None, 0.00055152, 2.01457e-06),
    ("qnewton", 1e-10, 8192, 2, 64, "quantum", None, 0.00055152, 0.000189121),
    ("qnewton", 1e-10, 8192, 10000, 2, "quantum", None, 0.0350215, 0.0112273),
    ("qnewton", 1e-10, 8192, 10000, 64, "cg", None, 0.0350215, 2.86393),
    ("costa", 1e-06, 16, 2, 2, "cholesky", 1.87733e-06, 4.032e-06, 0.0185008),
    ("costa", 1e-06, 16, 2, 16, "cholesky", 1.87733e-06, 4.032e-06, 0.0740032),
    ("costa", 1e-06, 16, 10000, 2, "cholesky", 1.87733e-06, 1.0752e-05, 92.504),
    ("costa", 1e-06, 16, 10000, 16, "cholesky", 1.87733e-06, 1.0752e-05, 370.016),
    ("costa", 1e-06, 512, 2, 2, "cg", 0.0452635, 0.00317645, 0.0416268),
    ("costa", 1e-06, 512, 2, 64, "cg", 0.0452635, 0.00317645, 0.666029),
    ("costa", 1e-06, 512, 10000, 2, "cholesky", 0.0452635, 0.201704, 208.134),
    ("costa", 1e-06, 512, 10000, 64, "cholesky", 0.0452635, 0.201704, 3330.15),
    ("costa", 1e-06, 8192, 2, 2, "cg", None, 0.00055152, 0.0601276),
    ("costa", 1e-06, 8192, 2, 64, "cg", None, 0.00055152, 0.962042),
    ("costa", 1e-06, 8192, 10000, 2, "cg", None, 0.0350215, 300.638),
    ("costa", 1e-06, 8192, 10000, 64, "cg", None, 0.0350215, 4810.21),
    ("costa", 1e-10, 16, 2, 2, "quantum", 1.87733e-06, 4.032e-06, 1.85008e-06),
    ("costa", 1e-10, 16, 2, 16, "cholesky", 1.87733e-06, 4.032e-06, 7.40032e-06),
    ("costa", 1e-10, 16, 10000, 2, "cholesky", 1.87733e-06, 1.0752e-05, 0.0092504),
    ("costa", 1e-10, 16, 10000, 16, "cholesky", 1.87733e-06, 1.0752e-05, 0.0370016),
    ("costa", 1e-10, 512, 2, 2, "quantum", 0.0452635, 0.00317645, 4.16268e-06),
    ("costa", 1e-10, 512, 2, 64, "quantum", 0.0452635, 0.00317645, 6.66029e-05),
    ("costa", 1e-10, 512, 10000, 2, "quantum", 0.0452635, 0.201704, 0.0208134),
    ("costa", 1e-10, 512, 10000, 64, "cholesky", 0.0452635, 0.201704, 0.333015),
    ("costa", 1e-10, 8192, 2, 2, "quantum", None, 0.00055152, 6.01276e-06),
    ("costa", 1e-10, 8192, 2, 64, "quantum", None, 0.00055152, 9.62042e-05),
    ("costa", 1e-10, 8192, 10000, 2, "quantum", None, 0.0350215, 0.0300638),
    ("costa", 1e-10, 8192, 10000, 64, "cg", None, 0.0350215, 0.481021),
]


def _decide(model: str, gate_time: float, n: int, kappa: float, d: int):
    # the snapshot keeps the gate-only oracle (the paper's model); test_scheduler.py checks oracle_cost "row"
    hp = NewtonParams(quantum_model=model, gate_time=gate_time, flop_rate=1e9, oracle_cost="gate", verbose=False)
    dense = n <= 512
    system = System("b", n, dense, kappa, kappa, d, d / 4, n * n if dense else n * d, None if dense else 1e-5)
    return Scheduler(hp, quantum=True, flop_rate=hp.flop_rate).decide(system, step=0)


def test_decision_table_snapshot() -> None:
    changed = []
    for model, gate, n, kappa, d, chosen, *costs in TABLE:
        dec = _decide(model, gate, n, kappa, d)
        got = [dec.predicted_s.get(k) for k in ("cholesky", "cg", "quantum")]
        same = all((w is None and g is None) or (g is not None and w is not None and g == pytest.approx(w, rel=1e-5))
                   for w, g in zip(costs, got, strict=True))
        if dec.chosen != chosen or not same:
            changed.append(((model, gate, n, kappa, d), (chosen, *costs), (dec.chosen, *got)))
    assert not changed, f"{len(changed)} rows changed (inputs, snapshot, now): {changed[:4]}"
    assert {row[5] for row in TABLE} == {"cholesky", "cg", "quantum"}  # the table exercises every outcome


def test_snapshot_rows_agree_with_the_hand_formulas() -> None:
    """Two rows re-derived by hand (ε = 1e-3): the snapshot is not just whatever the code printed."""
    # n = 16 dense: Cholesky 16³/3 + 2·16² = 1877.33 flops; CG ceil(½√2 ln 2000) = 6 iterations (<= n)
    # x (2·256 + 160) flops = 4032 -> 1.87733e-6 s and 4.032e-6 s at 1e9 flop/s
    row = next(r for r in TABLE if r[:5] == ("costa", 1e-6, 16, 2, 2))
    assert row[5] == "cholesky" and row[6:8] == pytest.approx([1.87733e-06, 4.032e-06], rel=1e-5)
    # Costa, α = clamp(2/4, 1, 2) = 1: (2305·2 + 2 ln 2000) queries x ceil(log2 16) = 4 gates x 1 µs
    assert row[8] == pytest.approx((2305 * 2 + 2 * math.log(2000)) * 4 * 1e-6, rel=1e-6)
