"""Flower's Ray simulation engine (the default engine) end to end, on a small local Ray.

Runs in CI: 2 clients on a local Ray of 2 CPUs that Flower's backend starts for the run and stops
at its end (about 30-50 s on a busy 2-core machine, most of it Ray and worker start-up). Deselect
with ``-m "not ray"``.
"""

from __future__ import annotations

import pytest
from fl_helpers import tiny_fl

from expertkit.federated.simulate import simulate


@pytest.fixture
def local_ray():
    """No Ray before the test; none left running after it, even when it fails."""
    import ray

    assert not ray.is_initialized(), "a Ray instance is already running in this process"
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.ray
def test_ray_engine_runs_two_signed_rounds_with_an_attacker(local_ray):
    import ray

    res = simulate(tiny_fl(clients=2, rounds=2, engine="ray", threads=1, attack={"kind": "tamper", "client": 0}),
                   write=False)
    assert not ray.is_initialized()  # the engine stopped its Ray
    assert res["signing"]["accepted"] == {"1": ["client-1"], "2": ["client-1"]}
    rejections = res["signing"]["rejections"]
    assert [r["client"] for r in rejections] == ["client-0", "client-0"]
    assert all("content altered after signing" in r["reason"] for r in rejections)
    # the tampered signature does not verify: the failures count against the node that sent them
    (node,) = {r["node_id"] for r in rejections}
    assert res["signing"]["flagged"] == [f"node {node}"] and {r["charged"] for r in rejections} == {f"node {node}"}
    assert set(res["final_state"]) and res["scheme"] == "ml-dsa-65"
