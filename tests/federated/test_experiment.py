"""experiments/fl_pqc.py --smoke: the five runs, the bit-for-bit checks and the paired verdicts on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.scripts import load_script


def test_smoke_run_checks_round0_bitwise_claims_and_reads_runs_back(tmp_path, capsys):
    exp = load_script("experiments/fl_pqc.py")
    out = tmp_path / "run"
    res = exp.main(["--smoke", "--out", str(out)])
    runs, found = res["runs"], res["claims"]
    assert list(runs) == list(exp.RUNS)
    for r in runs.values():  # every run scores its own round 0 and its last round, per example
        assert set(r["eval_examples"]) == {"0", "2"}
        for rnd, ex in r["eval_examples"].items():
            assert len(ex["scores"]) == len(ex["predictions"]) == 16
            assert np.mean(ex["scores"]) == pytest.approx(r["accuracy"][rnd])
    assert found["round0_same_predictions"] and len(set(found["round0_accuracy"].values())) == 1
    assert found["honest_signed_equals_unsigned_bitwise"] and found["attacker_signed_equals_honest_only_bitwise"]
    assert runs["honest-only-signed"]["excluded_clients"] == [1]
    assert runs["honest-only-signed"]["signing"]["rejections"] == []
    assert len(runs["attacker-signed"]["signing"]["rejections"]) == 2
    assert found["attacker_signed_vs_honest_only"]["a_only"] == found["attacker_signed_vs_honest_only"]["b_only"] == 0
    printed = capsys.readouterr().out
    assert "| honest clients only (client 1 excluded), signed | " in printed
    assert "equals the run with client 1 excluded): supported (the same global adapter, bit for bit)" in printed
    assert "signing keeps the attacker out (signed with attacker beats unsigned with attacker): " in printed
    assert json.loads((out / "results.json").read_text())["claims"] == found
    again = exp.main(["--smoke", "--out", str(out)])  # every run is read back, not rerun
    assert all(r["cached"] for r in again["runs"].values()) and again["claims"] == found
    assert "read back" in capsys.readouterr().out
