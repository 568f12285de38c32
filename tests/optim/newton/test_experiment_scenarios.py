"""experiments/q_newton.py's re-accounting: a matrix-free block's oracle query costs its logged product."""

from __future__ import annotations

from tests.scripts import ROOT, load_script


def _decision(dense: bool, query_s: float) -> dict:
    predicted = {"cholesky": 1e-3, "cg": 2e-3, "quantum": 1.0} if dense else {"cg": 5.0, "quantum": 1.0}
    return {"step": 0, "block": "b", "n": 64, "kappa": 10.0, "kappa_q": 10.0, "d": 64, "alpha": 64.0,
            "predicted_s": predicted, "quantum_detail": {"query_s": query_s}, "measured_s": 0.25,
            "chosen": "cg"}


def test_row_oracle_keeps_an_expensive_operator_classical_and_gate_only_is_shown_apart(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))  # the script imports its sibling q_newton_lora
    q = load_script("experiments/q_newton.py")
    run = {"seconds": [10.0], "decisions": [_decision(dense=False, query_s=2.0)]}
    out = q.scenarios(run, flop_rate=1e10)
    assert out["measured_total_s"] == 10.0 and out["solve_share"] == 0.025
    attos = "1 as (the paper's attosecond hypothesis)"
    # every oracle query costs a 2 s operator product: classical at every gate time, the measured total kept
    for label in q.GATE_TIMES:
        assert out[label]["quantum_fraction"] == 0.0 and out[label]["classical_s"] == 10.0
    # one gate per query at 1 as: quantum, the solve's measured 0.25 s replaced by the model's time
    gate_only = out[f"{attos} [gate-only oracle]"]
    assert gate_only["quantum_fraction"] == 1.0 and gate_only["classical_s"] == 9.75
    assert 0 < gate_only["quantum_model_s"] < 1e-3
    # a stored matrix's row is read, not computed: no gate-only variant, and 1 as goes quantum
    dense = q.scenarios({"seconds": [10.0], "decisions": [_decision(dense=True, query_s=0.0)]}, flop_rate=1e10)
    assert not any("gate-only" in k for k in dense) and dense[attos]["quantum_fraction"] == 1.0
