"""The signed strategy wrapper and client mod in whole federated runs (inline engine, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
from fl_helpers import reply, tiny_fl

from expertkit.federated.apps import make_client_app, run_server
from expertkit.federated.inline import InlineGrid, task_identity
from expertkit.federated.keys import Identity
from expertkit.federated.records import static_lookup
from expertkit.federated.simulate import simulate


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_honest_signed_run_aggregates_bit_for_bit_like_unsigned(strategy):
    signed = simulate(tiny_fl(strategy=strategy), write=False)
    plain = simulate(tiny_fl(strategy=strategy, signing={"scheme": "none"}), write=False)
    assert signed["signed"] and not plain["signed"]
    assert signed["signing"]["rejections"] == []
    assert signed["signing"]["accepted"] == {"1": ["client-0", "client-1", "client-2"],
                                             "2": ["client-0", "client-1", "client-2"]}
    assert _same(signed["final_state"], plain["final_state"])
    from expertkit.federated.local import workspace

    assert not _same(signed["final_state"], workspace(tiny_fl()).initial)  # training did move the adapter


def _fedavg_rounds(cfg, clients: list[int]) -> dict[str, np.ndarray]:
    """FedAvg over ``clients`` only, computed here from train_local (float64 average, weights = examples)."""
    from expertkit.federated.local import train_local, workspace

    state = dict(workspace(cfg).initial)
    for rnd in range(1, cfg.rounds + 1):
        outs = [train_local(cfg, p, state, rnd, 0.0) for p in clients]
        total = sum(n for _, n, _ in outs)
        state = {k: (sum(new[k].astype(np.float64) * n for new, n, _ in outs) / total).astype(np.float32)
                 for k in state}
    return state


def test_tampering_client_is_dropped_reported_and_rounds_complete():
    cfg = tiny_fl(rounds=3, attack={"kind": "tamper", "client": 1, "scale": 0.5})
    res = simulate(cfg, write=False)
    report = res["signing"]
    assert report["accepted"] == {str(r): ["client-0", "client-2"] for r in (1, 2, 3)}
    assert [(r["client"], r["node_id"]) for r in report["rejections"]] == [("client-1", 2)] * 3
    assert all("content altered after signing" in r["reason"] for r in report["rejections"])
    # the signature did not verify, so the claimed id is not charged: the node that sent it is
    assert report["flagged"] == ["node 2"] and {r["charged"] for r in report["rejections"]} == {"node 2"}
    # the dropped update never touches the model: the result is FedAvg over the honest clients 0 and 2
    honest, everyone = _fedavg_rounds(cfg, [0, 2]), _fedavg_rounds(cfg, [0, 1, 2])
    for k, v in res["final_state"].items():
        np.testing.assert_allclose(v, honest[k], rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(res["final_state"][k], everyone[k], rtol=1e-4, atol=1e-6) for k in honest)


def test_replayed_update_is_rejected_after_round_one():
    res = simulate(tiny_fl(rounds=3, attack={"kind": "replay", "client": 0}), write=False)
    rej = res["signing"]["rejections"]
    assert [(r["server_round"], r["client"]) for r in rej] == [(2, "client-0"), (3, "client-0")]
    assert all("signed for round 1" in r["reason"] and "replay" in r["reason"] for r in rej)
    assert res["signing"]["accepted"]["1"] == ["client-0", "client-1", "client-2"]


def _run(cfg, clients, trusted, server, client_trusts):
    app = make_client_app(cfg, clients, [client_trusts.public_key])
    with task_identity():
        return run_server(cfg, InlineGrid(app, cfg.clients), server=server,
                          lookup=static_lookup([c.public_key for c in trusted]), run_id="r")


def test_unknown_client_key_is_rejected():
    cfg = tiny_fl(clients=2, rounds=1)
    server = Identity.generate("server", "ed25519")
    clients = {0: Identity.generate("client-0", "ed25519"), 1: Identity.generate("client-1", "ed25519")}
    res = _run(cfg, clients, [clients[0]], server, server)  # client-1's key is not in the allowlist
    assert res["signing"]["accepted"] == {"1": ["client-0"]}
    (rej,) = res["signing"]["rejections"]
    assert rej["client"] == "client-1" and "unknown key" in rej["reason"]


def test_clients_refuse_a_global_model_not_signed_by_their_server():
    from expertkit.federated.local import workspace

    cfg = tiny_fl(clients=2, rounds=1)
    server, impostor = Identity.generate("server", "ml-dsa-44"), Identity.generate("server", "ml-dsa-44")
    clients = {p: Identity.generate(f"client-{p}", "ml-dsa-44") for p in range(2)}
    res = _run(cfg, clients, list(clients.values()), impostor, server)  # clients trust `server`, not the impostor
    assert res["signing"]["accepted"] == {"1": []}  # every reply is an error: nothing trained, nothing aggregated
    assert _same(res["final_state"], workspace(cfg).initial)


def test_wrapper_rejects_duplicates_and_node_changes_and_passes_only_verified_replies():
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from expertkit.federated.records import CLIENT_ROLE, sign_content
    from expertkit.federated.strategy import SignedStrategy

    a, b = Identity.generate("client-a", "ed25519"), Identity.generate("client-b", "ed25519")

    def content(ident, value, rnd, weight=1):
        c = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))}),
                        "metrics": MetricRecord({"num-examples": weight})})
        sign_content(c, ident, run_id="r", server_round=rnd, role=CLIENT_ROLE)
        return c

    seen = []

    class Spy(FedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen.append([float(m.content["arrays"]["w"].numpy()[0]) for m in replies])
            return super().aggregate_train(server_round, replies)

    s = SignedStrategy(Spy(), static_lookup([a.public_key, b.public_key]), Identity.generate("server", "ed25519"),
                       run_id="r", report_after=2)
    with task_identity():
        arrays, _ = s.aggregate_train(1, [reply(content(a, 1.0, 1), 1), reply(content(b, 3.0, 1, weight=3), 2),
                                          reply(content(a, 9.0, 1), 1)])  # a's second update: replay
        np.testing.assert_array_equal(arrays["w"].numpy(), np.full(3, 2.5, dtype=np.float32))  # (1*1 + 3*3) / 4
        assert seen == [[1.0, 3.0]]
        assert "second update from 'client-a'" in s.rejections[-1].reason
        s.aggregate_train(2, [reply(content(a, 1.0, 2), 2), reply(content(b, 3.0, 2), 2)])  # a on b's node
    assert "'client-a' sent from node 2, earlier from node 1 (reassigned)" in s.rejections[-1].reason
    assert s.flagged == {"client-a"} and s.accepted == {1: ["client-a", "client-b"], 2: ["client-b"]}


def test_excluded_client_gives_bit_for_bit_the_run_that_drops_all_its_updates():
    # the attacker's every update is rejected; excluding the client instead must give the same global
    # adapter bit for bit: the same nodes sampled in the same order, the same surviving updates, the
    # same example weights. Four clients, so three updates survive and their summation order matters.
    clients = 4
    attacked = simulate(tiny_fl(clients=clients, eval_n=4, attack={"kind": "tamper", "client": 1, "scale": 0.5}),
                        write=False)
    excluded = simulate(tiny_fl(clients=clients, eval_n=4, exclude_clients=[1]), write=False)
    honest = [f"client-{p}" for p in range(clients) if p != 1]
    assert attacked["signing"]["accepted"] == excluded["signing"]["accepted"] == {"1": honest, "2": honest}
    assert len(attacked["signing"]["rejections"]) == 2 and excluded["signing"]["rejections"] == []
    assert excluded["excluded_clients"] == [1]
    assert _same(attacked["final_state"], excluded["final_state"])
    assert attacked["train_loss"] == excluded["train_loss"]
    assert attacked["eval_examples"] == excluded["eval_examples"]
    everyone = simulate(tiny_fl(clients=clients, signing={"scheme": "none"}), write=False)
    assert not _same(everyone["final_state"], excluded["final_state"])  # client 1's data does move the adapter


@pytest.mark.parametrize(("extra", "message"), [
    (dict(exclude_clients=[3]), r"exclude_clients \[3\] outside the partition ids 0..2"),
    (dict(exclude_clients=[0, 0]), "lists a client twice"),
    (dict(exclude_clients=[0, 1, 2]), "leaves none of the 3 clients"),
    (dict(exclude_clients=[1], attack={"kind": "tamper", "client": 1}), "attack.client 1 is in exclude_clients"),
])
def test_exclude_clients_is_validated(extra, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        tiny_fl(**extra)
