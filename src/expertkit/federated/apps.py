"""Flower apps for federated LoRA: the ClientApp (with signing and attack mods) and the server loop.

* :func:`make_client_app` — a ClientApp whose ``train`` handler runs :func:`~.local.train_local`
  on the node's shard (``node_config["partition-id"]``). With signing on, :class:`NodeSigningMod`
  verifies the server-signed model and signs the reply with the node's own key; an
  :class:`AttackMod` (experiments only) tampers with or replays a chosen client's reply *after*
  signing, like an attacker on the wire.
* :func:`run_server` — the ServerApp body: the initial adapter, the strategy (wrapped in
  :class:`~.strategy.SignedStrategy` when signing), central evaluation after each round, and a
  JSON-ready result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from expertkit.errors import ConfigError
from expertkit.federated.client_mod import SigningMod
from expertkit.federated.config import AttackConfig, FlConfig
from expertkit.federated.keys import Identity, PublicKey
from expertkit.federated.records import Lookup

STRATEGIES = ("fedavg", "fedprox", "fedadam")
EXCLUDED_CODE = 4712  # Flower error code of the reply of a client in ``exclude_clients``


def state_of(arrays: Any) -> dict[str, np.ndarray]:
    """An ArrayRecord as ``{name: ndarray}`` (record order)."""
    return {k: v.numpy() for k, v in arrays.items()}


def to_arrays(state: dict[str, np.ndarray]) -> Any:
    """``{name: ndarray}`` as an ArrayRecord (same order)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


class NodeSigningMod:
    """Pick the node's :class:`SigningMod` from its ``partition-id`` (simulation: one key per node)."""

    def __init__(self, identities: dict[int, Identity], server_keys: list[PublicKey] | None, alg: str) -> None:
        self.mods = {p: SigningMod(i, server_keys, alg=alg) for p, i in identities.items()}

    def __call__(self, msg: Any, ctxt: Any, call_next: Any) -> Any:
        """Delegate to the node's signing mod."""
        pid = int(ctxt.node_config["partition-id"])
        if pid not in self.mods:
            raise ConfigError(f"no signing key for partition {pid}.")
        return self.mods[pid](msg, ctxt, call_next)


class AttackMod:
    """Experiments only: corrupt one client's training replies after they were signed."""

    def __init__(self, attack: AttackConfig) -> None:
        self.attack = attack

    def __call__(self, msg: Any, ctxt: Any, call_next: Any) -> Any:
        """Run the app, then tamper with or replay the reply of the attacked partition."""
        from flwr.app import Array, MessageType

        reply = call_next(msg, ctxt)
        if (msg.metadata.message_type != MessageType.TRAIN or reply.has_error()
                or int(ctxt.node_config["partition-id"]) != self.attack.client):
            return reply
        rnd = int(msg.content["config"]["server-round"])
        if self.attack.kind == "tamper":
            rng = np.random.default_rng(1000 + rnd)
            arrays = reply.content["arrays"]
            for k in list(arrays.keys()):
                a = arrays[k].numpy()
                arrays[k] = Array((a + rng.normal(0.0, self.attack.scale, a.shape)).astype(a.dtype))
        elif self.attack.kind == "replay":
            from flwr.app import RecordDict

            stash = {f"attack.{k}": k for k in reply.content.keys()}
            if not any(s in ctxt.state for s in stash):  # first round: keep a copy of the signed reply
                for s_key, key in stash.items():
                    ctxt.state[s_key] = _copy_content(reply.content[key])
            else:  # later rounds: send the old update (and its old signature) again
                old = {k.removeprefix("attack."): v for k, v in ctxt.state.items() if k.startswith("attack.")}
                reply.content = RecordDict({k: _copy_content(v) for k, v in old.items()})
        return reply


def _copy_content(content: Any) -> Any:
    import copy

    return copy.deepcopy(content)


def make_client_app(cfg: FlConfig, identities: dict[int, Identity] | None, server_keys: list[PublicKey] | None,
                    *, signing_mod: Any = None) -> Any:
    """The ClientApp: local LoRA training; signing when ``identities`` (or ``signing_mod``) is given."""
    from flwr.clientapp import ClientApp

    mods: list[Callable[..., Any]] = []
    if cfg.attack.kind != "none":
        mods.append(AttackMod(cfg.attack))
    if signing_mod is not None:
        mods.append(signing_mod)
    elif identities is not None:
        mods.append(NodeSigningMod(identities, server_keys, cfg.signing.digest))
    app = ClientApp(mods=mods)
    app.train()(train_handler(lambda context: cfg))
    return app


def train_handler(get_cfg: Callable[[Any], FlConfig]) -> Callable[[Any, Any], Any]:
    """The ClientApp ``train`` handler: local LoRA training on the node's shard.

    A client in ``exclude_clients`` answers with an error reply instead (:data:`EXCLUDED_CODE`).
    It stays a node, so the server samples the same nodes in the same order as in a run where
    it takes part, and strategies skip error replies: each round aggregates the other clients'
    updates exactly as when every update of that client is dropped before aggregation.
    """

    def train(msg: Any, context: Any) -> Any:
        from flwr.app import Error, Message, MetricRecord, RecordDict

        from expertkit.federated.local import train_local

        cfg = get_cfg(context)
        pid = int(context.node_config["partition-id"])
        if pid in cfg.exclude_clients:  # takes no part: no training, its shard unused, no update to aggregate
            return Message(Error(code=EXCLUDED_CODE, reason=f"client {pid} is excluded from this run "
                                 "(exclude_clients)"), reply_to=msg)
        config = msg.content["config"]
        new, n, loss = train_local(cfg, pid, state_of(msg.content["arrays"]), int(config["server-round"]),
                                   float(config.get("proximal-mu", 0.0)))
        content = RecordDict({"arrays": to_arrays(new), "metrics": MetricRecord({"num-examples": n, "train_loss": loss})})
        return Message(content=content, reply_to=msg)

    return train


def build_strategy(cfg: FlConfig) -> Any:
    """The inner Flower strategy (``fedavg``, ``fedprox`` or ``fedadam``), every client in every round."""
    from flwr.serverapp import strategy as st

    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.clients,
                  min_available_nodes=cfg.clients, min_evaluate_nodes=0)
    kinds = {"fedavg": st.FedAvg, "fedprox": st.FedProx, "fedadam": st.FedAdam}
    params = dict(cfg.strategy_params)
    if cfg.strategy == "fedprox":
        params.setdefault("proximal_mu", 0.01)
    try:
        return kinds[cfg.strategy](**common, **params)
    except TypeError as exc:
        raise ConfigError(f"strategy_params for {cfg.strategy}: {exc}") from None


def run_server(cfg: FlConfig, grid: Any, *, server: Identity | None, lookup: Lookup | None,
               run_id: str | None = None) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds on ``grid``; returns accuracies, timings, final adapter and signing report.

    ``eval_examples`` holds, per evaluated round, the per-example ``scores`` and ``predictions`` of
    the global adapter on the ``eval_n`` test examples (the same examples in every run: paired tests).
    """
    from flwr.app import MetricRecord

    from expertkit.federated.local import evaluate_state, workspace
    from expertkit.federated.strategy import SignedStrategy

    initial = workspace(cfg).initial
    inner = build_strategy(cfg)
    signed = server is not None and lookup is not None
    strategy = SignedStrategy(inner, lookup, server, run_id=run_id, report_after=cfg.signing.report_after,
                              exclude_flagged=cfg.signing.exclude_flagged, alg=cfg.signing.digest) if signed else inner
    accuracy: dict[int, float] = {}
    per_example: dict[int, dict[str, list[Any]]] = {}
    marks: dict[int, float] = {}

    def evaluate_fn(server_round: int, arrays: Any) -> Any:
        marks[server_round] = time.perf_counter()
        skip = (server_round == 0 and not cfg.eval_initial) or (
            0 < server_round < cfg.rounds and cfg.eval_rounds == "last")
        if not cfg.eval_n or skip:
            return None
        res = evaluate_state(cfg, state_of(arrays))
        acc = accuracy[server_round] = float(res.accuracy)
        per_example[server_round] = {"scores": res.scores, "predictions": res.predictions}
        marks[server_round] = time.perf_counter()  # round time excludes the evaluation
        return MetricRecord({"accuracy": acc})

    started = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=to_arrays(initial), num_rounds=cfg.rounds, evaluate_fn=evaluate_fn)
    final = state_of(result.arrays) if result.arrays else initial  # no round aggregated: the initial adapter
    out: dict[str, Any] = {
        "accuracy": {str(k): v for k, v in sorted(accuracy.items())}, "seconds": time.perf_counter() - started,
        "signed": signed, "scheme": cfg.signing.scheme if signed else "none", "final_state": final,
        "train_loss": {str(k): float(v.get("train_loss", float("nan")))
                       for k, v in result.train_metrics_clientapp.items()},
        "eval_examples": {str(k): v for k, v in sorted(per_example.items())},
        "excluded_clients": list(cfg.exclude_clients),
    }
    if signed:
        out["signing"] = strategy.report()
    return out
