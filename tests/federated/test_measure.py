"""The per-round overhead formula of `expertkit fl measure` with known numbers (no timing asserted)."""

from __future__ import annotations

import pytest

from expertkit.federated import measure as m

ROWS = [{"scheme": "fast", "family": "x", "post_quantum": True, "public_key_bytes": 10, "signature_bytes": 20,
         "keygen_ms": 1.0, "sign_ms": 2.0, "verify_ms": 0.5},
        {"scheme": "slow", "family": "y", "post_quantum": False, "public_key_bytes": 30, "signature_bytes": 40,
         "keygen_ms": 9.0, "sign_ms": 100.0, "verify_ms": 20.0}]
HASHING = {str(2**20): 0.01, str(2**24): 0.25}  # seconds to hash 1 MiB and 16 MiB


def test_overhead_is_two_hashes_plus_sign_and_verify():
    rows = m.overhead(ROWS, HASHING, round_seconds=10.0)
    assert [(r["scheme"], r["update_bytes"]) for r in rows] == [("fast", 2**20), ("fast", 2**24), ("slow", 2**20),
                                                                ("slow", 2**24)]
    assert [r["added_seconds"] for r in rows] == pytest.approx([
        0.0225,  # 2 * 0.01 + (2.0 + 0.5) / 1000
        0.5025,  # 2 * 0.25 + 0.0025
        0.14,    # 2 * 0.01 + (100 + 20) / 1000
        0.62])
    assert [r["fraction_of_round"] for r in rows] == pytest.approx([0.00225, 0.05025, 0.014, 0.062])
    assert all(r["fraction_of_round"] is None for r in m.overhead(ROWS, HASHING, round_seconds=None))


def test_measure_combines_the_timings_with_the_formula(monkeypatch):
    monkeypatch.setattr(m, "measure_scheme", lambda name, repeats: next(r for r in ROWS if r["scheme"] == name))
    monkeypatch.setattr(m, "hash_seconds", lambda size, alg: HASHING[str(size)])
    res = m.measure(["fast", "slow"], sizes_mb=(1,), full_model_bytes=2**24, round_seconds=5.0)
    assert [o["update_bytes"] for o in res["overhead"]] == [2**20, 2**24] * 2
    assert [o["fraction_of_round"] for o in res["overhead"]] == pytest.approx([0.0045, 0.1005, 0.028, 0.124])
    table = m.markdown(res)
    assert "| fast | 22.5 (0.450%) | 502.5 (10.050%) |" in table and "| slow | 140.0 (2.800%) | 620.0 (12.400%) |" in table
    assert "| fast | yes | 10 | 20 | 1.000 | 2.000 | 0.500 |" in table
