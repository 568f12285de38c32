"""Malformed replies (issue 20): each is dropped and reported on its own, the round completes with
the honest replies, and the aggregate equals FedAvg over the honest clients computed here.

Attackers: any connected node (no trusted key: it may copy a trusted client's id and
fingerprint, which are public), and a trusted client that signs a reply of the wrong shape.
Failures count against a verified client id only, otherwise against the delivering node.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fl_helpers import reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from expertkit.federated.client_mod import SigningMod
from expertkit.federated.inline import task_identity
from expertkit.federated.keys import Identity
from expertkit.federated.records import CLIENT_ROLE, EVAL_ROLE, SERVER_ROLE, SIG_KEY, sign_content, static_lookup
from expertkit.federated.strategy import SignedStrategy

RUN, BAD_NODE = "r", 9
A, B, C = (Identity.generate(f"client-{x}", "ed25519") for x in "abc")  # all three trusted by the server
MALLORY = Identity.generate("client-a", "ed25519")  # claims client-a's id; its key is not trusted
SERVER = Identity.generate("server", "ed25519")
HONEST = {A: 1.0, B: 3.0}  # value -> tensors; weight == value: FedAvg = (1*1 + 3*3) / 4 per unit tensor


def _tensors(value: float) -> dict[str, np.ndarray]:
    return {"w": np.array([value, 2 * value, -value], dtype=np.float32),
            "v": np.full((2, 2), value + 1, dtype=np.float32)}


def _fedavg_of_honest() -> dict[str, np.ndarray]:
    """FedAvg over A and B, computed independently (float64, weights = their num-examples)."""
    total = sum(HONEST.values())
    return {k: sum(w * _tensors(w)[k].astype(np.float64) for w in HONEST.values()) / total for k in ("w", "v")}


def _content(ident: Identity, value: float, rnd: int = 1, *, weight: float | None = None, role: str = CLIENT_ROLE,
             metrics: dict | None = None, arrays: dict | None = None) -> RecordDict:
    recs = {"arrays": ArrayRecord({k: Array(v) for k, v in (arrays or _tensors(value)).items()}),
            "metrics": MetricRecord(metrics or {"num-examples": value if weight is None else weight, "train_loss": 0.5})}
    if role != CLIENT_ROLE:
        del recs["arrays"]
    c = RecordDict(recs)
    sign_content(c, ident, run_id=RUN, server_round=rnd, role=role)
    return c


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2, BAD_NODE]


def _strategy(report_after: int = 2) -> SignedStrategy:
    from flwr.serverapp.strategy import FedAvg

    inner = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=2, min_available_nodes=2)
    return SignedStrategy(inner, static_lookup([A.public_key, B.public_key, C.public_key]), SERVER, run_id=RUN,
                          report_after=report_after)


def _train_round(s: SignedStrategy, bad: RecordDict, rnd: int = 1):
    """Configure round ``rnd`` (the server sends zeros of the honest layout), then aggregate
    client-a's, the bad and client-b's replies (the bad one in the middle)."""
    with task_identity():
        s.configure_train(rnd, ArrayRecord({k: Array(np.zeros_like(v)) for k, v in _tensors(0).items()}),
                          ConfigRecord({}), _Grid())
        replies = [reply(_content(A, 1.0, rnd), 1), reply(bad, BAD_NODE), reply(_content(B, 3.0, rnd), 2)]
        return s.aggregate_train(rnd, replies)


def _assert_honest_fedavg(s: SignedStrategy, arrays, metrics, rnd: int = 1) -> None:
    assert arrays is not None and s.accepted[rnd] == ["client-a", "client-b"]
    want = _fedavg_of_honest()
    assert sorted(arrays.keys()) == ["v", "w"]
    for k, v in want.items():
        np.testing.assert_allclose(arrays[k].numpy(), v, rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx(0.5)


def _set(record, key, value):
    """Put ``value`` under ``key`` bypassing Flower's type checks (a permissive or hostile decoder)."""
    record.__dict__["_data"][key] = value


def _copied(value: float = 5.0) -> RecordDict:
    """client-a's id, fingerprint and signature record, copied onto other content by an attacker."""
    return _content(A, value)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _changed(change):
    """client-a's copied reply, then ``change(content)`` (after signing: not re-signed)."""
    def build() -> RecordDict:
        c = _copied()
        change(c)
        return c
    return build


def _sig(**fields):
    return _changed(lambda c: [_set(c[SIG_KEY], k, v) for k, v in fields.items()])


def _arr(**fields):
    return _changed(lambda c: [object.__setattr__(c["arrays"]["w"], k, v) for k, v in fields.items()])


def _record(key, value):
    return _changed(lambda c: _set(c, key, value))


UNVERIFIED = {  # name -> (build the bad content, words of the reason); charged to the delivering node
    "signature huge int": (_sig(signature=2**62), "'signature' is int, not bytes"),
    "signature bigger than 2^64": (_sig(signature=10**30), "'signature' is int, not bytes"),
    "signature str": (_sig(signature="c2lnbmF0dXJl"), "'signature' is str, not bytes"),
    "signature list": (_sig(signature=[1, 2, 3]), "'signature' is list, not bytes"),
    "signature missing": (_changed(lambda c: c[SIG_KEY].__dict__["_data"].pop("signature")), "'signature' is missing"),
    "digest str": (_sig(digest="00"), "'digest' is str, not bytes"),
    **{f"{f} int": (_sig(**{f: 7}), f"'{f}' is int, not a string")
       for f in ("scheme", "key", "sender", "run-id", "role", "alg")},
    "sender too long": (_sig(sender="x" * 10_000), "'sender' is 10000 characters long"),
    "alg unknown": (_sig(alg="md5"), "unknown digest algorithm 'md5'"),
    "round str": (_sig(round="1"), "'round' is str, not an int"),
    "round float": (_sig(round=1.0), "'round' is float, not an int"),
    "round infinite": (_sig(round=float("inf")), "'round' is float, not an int"),
    "round bool": (_sig(round=True), "'round' is bool, not an int"),
    "round negative": (_sig(round=-1), "'round' is outside 0 .. 2^63-1"),
    "round huge": (_sig(round=2**70), "'round' is outside 0 .. 2^63-1"),
    "signature record not a config record": (_record(SIG_KEY, ArrayRecord({"x": Array(np.zeros(1))})),
                                             "ArrayRecord instead of a config record"),
    "negative dim": (_arr(shape=(-3,)), "tensor 'w': dimension -3"),
    "dim 2^64": (_arr(shape=(2**64,)), "tensor 'w': dimension 18446744073709551616"),
    "dim huge": (_arr(shape=(10**40,)), "tensor 'w': dimension a huge number"),
    "dim float": (_arr(shape=(1.5,)), "a dimension of type float"),
    "dim bool": (_arr(shape=(True,)), "a dimension of type bool"),
    "shape str": (_arr(shape="abc"), "shape of type str"),
    "shape int": (_arr(shape=3), "shape of type int"),
    "dtype int": (_arr(dtype=7), "stype and dtype must be strings"),
    "stype None": (_arr(stype=None), "stype and dtype must be strings"),
    "data int": (_arr(data=12), "data of type int"),
    "data str": (_arr(data="abc"), "data of type str"),
    "record not a record": (_record("junk", 5), "record 'junk' of type int"),
    "metric value huge int": (_changed(lambda c: _set(c["metrics"], "train_loss", 2**80)),
                              "integer value outside the signed 64-bit range"),
    "untrusted key claiming client-a": (lambda: _content(MALLORY, 5.0), "unknown key"),
    "client-a's key, bad signature": (_sig(signature=bytes(64)), "signature does not verify"),
}


def _one_bad_reply(table: dict, case: str):
    """Round 1 with the honest replies and ``table[case]``'s bad one: the honest FedAvg, one rejection."""
    build, words = table[case]
    s = _strategy(report_after=1)
    arrays, metrics = _train_round(s, build())
    _assert_honest_fedavg(s, arrays, metrics)
    (rej,) = s.rejections
    assert words in rej.reason and len(rej.reason) < 400, rej.reason
    return s, rej


@pytest.mark.parametrize("case", list(UNVERIFIED))
def test_malformed_or_forged_reply_is_dropped_and_charged_to_its_node(case):
    s, rej = _one_bad_reply(UNVERIFIED, case)
    assert rej.node_id == BAD_NODE and rej.charged == f"node {BAD_NODE}"
    assert s.flagged == {f"node {BAD_NODE}"} and s.failures == {f"node {BAD_NODE}": 1}  # never client-a


def _signed_by_c(**kw):
    return lambda: _content(C, 5.0, **kw)


def _signed_by_c_after(change):
    def build() -> RecordDict:
        c = _content(C, 5.0)
        del c[SIG_KEY]
        change(c)
        sign_content(c, C, run_id=RUN, server_round=1, role=CLIENT_ROLE)
        return c
    return build


def _swap_w(array: Array):
    return _signed_by_c_after(lambda c: c["arrays"].__setitem__("w", array))


SIGNED_BAD = {  # a trusted client signs a reply that cannot be aggregated: charged to that client
    "weight zero": (_signed_by_c(weight=0), "weight 'num-examples' is 0"),
    "weight negative": (_signed_by_c(weight=-1.0), "weight 'num-examples' is -1.0"),
    "weight nan": (_signed_by_c(weight=float("nan")), "weight 'num-examples' is nan"),
    "weight missing": (_signed_by_c(metrics={"train_loss": 0.5}), "weight 'num-examples' is None"),
    "weight bool": (_signed_by_c_after(lambda c: _set(c["metrics"], "num-examples", True)), "is True"),
    "metric str": (_signed_by_c_after(lambda c: _set(c["metrics"], "train_loss", "low")), "metric 'train_loss'"),
    "npy bytes of another shape": (_swap_w(Array("float32", (3,), "numpy.ndarray", _npy(np.ones(1, np.float32)))),
                                   "the bytes hold float32 (1,), the record declares float32 (3,)"),
    "npy bytes of another dtype": (_swap_w(Array("float32", (3,), "numpy.ndarray", _npy(np.ones(3, np.float64)))),
                                   "the bytes hold float64 (3,)"),
    "npy truncated": (_swap_w(Array("float32", (3,), "numpy.ndarray", _npy(np.ones(3, np.float32))[:-2])),
                      "10 bytes of data for shape (3,)"),
    "not npy": (_swap_w(Array("float32", (3,), "numpy.ndarray", b"not an npy buffer")), "not a readable .npy"),
    "other serialization": (_swap_w(Array("float32", (3,), "torch", _npy(np.ones(3, np.float32)))),
                            "serialization 'torch'"),
    "wrong shape": (_signed_by_c(arrays={"w": np.ones(4, np.float32), "v": np.ones((2, 2), np.float32)}),
                    "tensor 'w' is of shape (4,), expected of shape (3,)"),
    "missing tensor": (_signed_by_c(arrays={"w": np.ones(3, np.float32)}), "tensors missing ['v']"),
    "extra tensor": (_signed_by_c(arrays={**_tensors(5.0), "x": np.ones(1, np.float32)}), "unexpected ['x']"),
    "int32 among float32": (_signed_by_c(arrays={k: v.astype(np.int32) for k, v in _tensors(5.0).items()}),
                            "differ from the round's other replies: tensor 'v' is int32 (2, 2), expected float32"),
    "two metric records": (_signed_by_c_after(lambda c: c.__setitem__("m2", MetricRecord({"x": 1.0}))),
                           "2 metric records"),
    "two array records": (_signed_by_c_after(lambda c: c.__setitem__("a2", ArrayRecord({"x": Array(np.ones(1))}))),
                          "2 array records"),
    "other metric names": (_signed_by_c(metrics={"num-examples": 5.0, "train_loss": 0.5, "acc": 1.0}),
                           "its metrics ['acc', 'num-examples', 'train_loss'] in 'metrics' differ"),
}


@pytest.mark.parametrize("case", list(SIGNED_BAD))
def test_signed_reply_of_the_wrong_shape_is_dropped_and_charged_to_its_signer(case):
    s, rej = _one_bad_reply(SIGNED_BAD, case)
    assert rej.charged == rej.client == "client-c" and s.flagged == {"client-c"}


def test_untrusted_key_claiming_a_client_id_never_gets_that_client_reported():
    s = _strategy(report_after=2)
    for rnd in (1, 2):
        _assert_honest_fedavg(s, *_train_round(s, _content(MALLORY, 5.0, rnd), rnd), rnd=rnd)
    assert [(r.client, r.charged) for r in s.rejections] == [("client-a", f"node {BAD_NODE}")] * 2
    assert s.flagged == {f"node {BAD_NODE}"} and s.failures["client-a"] == 0
    assert s.report()["rejections"][0]["charged"] == f"node {BAD_NODE}"


def test_evaluate_replies_are_verified_and_checked_one_by_one():
    s = _strategy(report_after=1)
    honest = {A: (1, 0.5), B: (3, 0.9)}  # weight, accuracy: weighted mean 0.8

    def ev(ident, n, acc, **kw):
        return _content(ident, 0.0, role=EVAL_ROLE, metrics={"num-examples": n, "accuracy": acc}, **kw)

    huge = ev(C, 5, 0.0)
    _set(huge[SIG_KEY], "signature", 2**62)
    as_train = _content(C, 5.0, metrics={"num-examples": 5, "accuracy": 0.0})  # a training signature
    unsigned = ev(C, 5, 0.0)
    del unsigned[SIG_KEY]
    listed = ev(C, 5, [0.0, 0.0])  # a list where the others send a number
    with task_identity():
        replies = [reply(ev(i, n, a), node) for node, (i, (n, a)) in enumerate(honest.items(), start=1)]
        bad = [reply(c, BAD_NODE) for c in (huge, as_train, unsigned)] + [reply(listed, 3)]
        metrics = s.aggregate_evaluate(1, replies[:1] + bad + replies[1:])
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert s.accepted_evaluate == {1: ["client-a", "client-b"]}
    reasons = [r.reason for r in s.rejections]
    assert "'signature' is int, not bytes" in reasons[0] and "expected a client-evaluation" in reasons[1]
    assert "unsigned" in reasons[2] and "its metrics ['accuracy', 'num-examples']" in reasons[3]
    assert [r.charged for r in s.rejections] == [f"node {BAD_NODE}"] * 3 + ["client-c"]


def _server_message(change=None, mtype="train"):
    from flwr.app import Message, MessageType

    c = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in _tensors(1.0).items()}),
                    "config": ConfigRecord({"server-round": 2})})
    sign_content(c, SERVER, run_id=RUN, server_round=2, role=SERVER_ROLE)
    if change is not None:
        change(c)
    kind = MessageType.TRAIN if mtype == "train" else MessageType.EVALUATE
    return Message(content=c, dst_node_id=1, message_type=kind)


def _run_mod(msg):
    from flwr.app import Context, Message

    calls = []

    def call_next(m, ctxt):
        calls.append(m)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 4, "accuracy": 0.5})}), reply_to=m)

    ctxt = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return SigningMod(A, [SERVER.public_key])(msg, ctxt, call_next), calls


CLIENT_SIDE = {  # the server's message as an attacker on the link changed it
    "round infinite": (lambda c: _set(c[SIG_KEY], "round", float("inf")), "'round' is float, not an int"),
    "round str": (lambda c: _set(c[SIG_KEY], "round", "2"), "'round' is str, not an int"),
    "round negative": (lambda c: _set(c[SIG_KEY], "round", -1), "'round' is outside 0 .. 2^63-1"),
    "run-id list": (lambda c: _set(c[SIG_KEY], "run-id", ["r"]), "'run-id' is list, not a string"),
    "signature huge int": (lambda c: _set(c[SIG_KEY], "signature", 2**62), "'signature' is int, not bytes"),
    "signature record not a config record": (lambda c: _set(c, SIG_KEY, MetricRecord({"round": 2})),
                                             "MetricRecord instead of a config record"),
    "negative dim": (lambda c: object.__setattr__(c["arrays"]["w"], "shape", (-3,)), "tensor 'w': dimension -3"),
    "dim 2^64": (lambda c: object.__setattr__(c["arrays"]["v"], "shape", (2**64, 1)), "dimension 18446744073709551616"),
    "data int": (lambda c: object.__setattr__(c["arrays"]["w"], "data", 7), "data of type int"),
}


@pytest.mark.parametrize("case", list(CLIENT_SIDE))
def test_client_refuses_a_malformed_server_message_with_an_error_reply(case):
    change, words = CLIENT_SIDE[case]
    with task_identity():
        out, calls = _run_mod(_server_message(change))
    assert out.has_error() and "client-a: refused server message" in out.error.reason
    assert words in out.error.reason and calls == []  # the local app never ran


def test_client_signs_train_and_evaluate_replies_that_the_server_accepts():
    s = _strategy()
    with task_identity():
        for mtype in ("train", "evaluate"):
            out, calls = _run_mod(_server_message(mtype=mtype))
            assert not out.has_error() and len(calls) == 1 and SIG_KEY not in calls[0].content
            role = CLIENT_ROLE if mtype == "train" else EVAL_ROLE
            assert out.content[SIG_KEY]["role"] == role and out.content[SIG_KEY]["sender"] == "client-a"
        metrics = s.aggregate_evaluate(2, [reply(out.content, 1)])
    assert metrics["accuracy"] == 0.5 and s.accepted_evaluate == {2: ["client-a"]}
