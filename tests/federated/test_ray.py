"""Flower's Ray simulation engine end to end (opt-in: set EXPERTKIT_RAY_TESTS=1; about 50 s here)."""

from __future__ import annotations

import os

import pytest
from fl_helpers import tiny_fl

from expertkit.federated.simulate import simulate


@pytest.mark.ray
@pytest.mark.skipif(os.environ.get("EXPERTKIT_RAY_TESTS") != "1", reason="set EXPERTKIT_RAY_TESTS=1 (Ray start-up is slow)")
def test_ray_engine_runs_two_signed_rounds_with_an_attacker():
    res = simulate(tiny_fl(clients=2, rounds=2, engine="ray", threads=1, attack={"kind": "tamper", "client": 0}),
                   write=False)
    assert res["signing"]["accepted"] == {"1": ["client-1"], "2": ["client-1"]}
    assert [r["client"] for r in res["signing"]["rejections"]] == ["client-0", "client-0"]
    assert res["signing"]["flagged"] == ["client-0"]
