"""The ServerApp side: a strategy wrapper that verifies every training reply before aggregation.

``SignedStrategy(inner, trust, server)`` wraps any Flower message-API strategy (FedAvg, FedProx,
FedAdam, ...). It

* signs every outgoing ``train`` / ``evaluate`` message (global model and config) with the
  server identity, bound to this run id and the round;
* verifies every ``train`` and ``evaluate`` reply against the allowlist for this run and round,
  and rejects duplicates within a round and a client id that moves to another node; each reply
  is parsed defensively and checked on its own (:mod:`.replies`: one metric record with a
  weight > 0, tensors whose bytes match the arrays the server sent), so a malformed reply is
  dropped, logged and kept in :attr:`rejections` with the reason while the round completes
  with the others;
* hands only verified replies to the inner strategy, so an unverified update never touches the
  global model; with no verified reply the global model stays as it was;
* counts failures against the verified client id, or against the delivering node (``node
  <id>``) when the signature did not verify; after ``report_after`` failures it is listed in
  :attr:`flagged` (and, with ``exclude_flagged``, that node is no longer sent work).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from expertkit.federated.keys import Identity, TrustStore
from expertkit.federated.records import (
    CLIENT_ROLE,
    EVAL_ROLE,
    SERVER_ROLE,
    SIG_KEY,
    Lookup,
    Verdict,
    sign_content,
    verify_content,
)
from expertkit.federated.replies import (
    ArrayLayout,
    array_layout,
    check_reply,
    layout_difference,
    metric_layout,
    pick_layout,
    without_dtypes,
)

log = logging.getLogger("expertkit.federated")


@dataclass(frozen=True)
class Rejection:
    """A reply that was dropped before aggregation."""

    server_round: int
    node_id: int
    client: str  # the client id the reply claimed ("" when it claimed none); not verified
    reason: str
    charged: str = ""  # who the failure counts against: a verified client id, else "node <id>"


class SignedStrategy:
    """Wrap a Flower strategy: sign what the server sends, verify what clients return."""

    def __init__(self, inner: Any, trust: TrustStore | Lookup, server: Identity, *, run_id: str | None = None,
                 report_after: int = 2, exclude_flagged: bool = False, alg: str = "sha3-256") -> None:
        self.inner = inner
        self.lookup: Lookup = trust.lookup if isinstance(trust, TrustStore) else trust
        self.server = server
        self.run_id = run_id or secrets.token_hex(8)
        self.report_after = report_after
        self.exclude_flagged = exclude_flagged
        self.alg = alg
        self.rejections: list[Rejection] = []
        self.accepted: dict[int, list[str]] = {}
        self.accepted_evaluate: dict[int, list[str]] = {}
        self.failures: Counter[str] = Counter()
        self.flagged: set[str] = set()
        self._node_of: dict[str, int] = {}
        self._flagged_nodes: set[int] = set()
        self._sent_arrays: dict[int, ArrayLayout] = {}

    def __getattr__(self, name: str) -> Any:  # weighted_by_key, arrayrecord_key, ... of the inner strategy
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- server -> clients ----------------------------------------------------------------
    def _sign(self, messages: Iterable[Any], server_round: int) -> list[Any]:
        out, done = [], set()
        for m in messages:
            if self.exclude_flagged and m.metadata.dst_node_id in self._flagged_nodes:
                continue
            if id(m.content) not in done:  # strategies share one RecordDict between messages
                sign_content(m.content, self.server, run_id=self.run_id, server_round=server_round,
                             role=SERVER_ROLE, alg=self.alg)
                done.add(id(m.content))
            out.append(m)
        return out

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        """The inner strategy's train messages, signed; their arrays are what replies must match."""
        messages = self._sign(self.inner.configure_train(server_round, arrays, config, grid), server_round)
        if messages:
            self._sent_arrays[server_round] = without_dtypes(array_layout(messages[0].content))
        return messages

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        """The inner strategy's evaluate messages, signed."""
        return self._sign(self.inner.configure_evaluate(server_round, arrays, config, grid), server_round)

    # -- clients -> server ----------------------------------------------------------------
    def verify_replies(self, server_round: int, replies: Iterable[Any], role: str = CLIENT_ROLE) -> list[Any]:
        """The replies that pass verification and the shape checks; the others go to :attr:`rejections`.

        Each reply is checked on its own and nothing it holds can raise out of here: a bad reply
        is dropped, logged and counted, and the round goes on with the others. A failure counts
        against the client id only when the reply's signature verified under that client's
        trusted key; otherwise against the node that delivered it (``"node <id>"``), so a forged
        reply that claims another client's id never gets that client reported.
        """
        train = role == CLIENT_ROLE
        passed: list[tuple[Any, str, int]] = []  # (message, verified sender, node)
        errors: list[Any] = []
        seen: set[str] = set()
        for m in replies:
            if m.has_error():  # no content: the inner strategy logs and skips it
                errors.append(m)
                continue
            node = int(m.metadata.src_node_id)
            try:
                v, reason = self._check_one(m, server_round, role, seen, node)
            except Exception as exc:  # noqa: BLE001 - the last guard: a reply never stops the round
                log.debug("round %d: checking the reply of node %d failed", server_round, node, exc_info=True)
                v, reason = Verdict(False), f"could not be checked ({type(exc).__name__}: {str(exc)[:200]})"
            if reason:
                self._reject(Rejection(server_round, node, v.sender, reason, v.sender if v.ok else f"node {node}"))
                continue
            seen.add(v.sender)
            self._node_of[v.sender] = node
            passed.append((m, v.sender, node))
        ok = self._consistent(server_round, passed, train)
        (self.accepted if train else self.accepted_evaluate)[server_round] = sorted(s for _, s, _ in ok)
        for m, _, _ in ok:
            del m.content[SIG_KEY]  # the inner strategy sees exactly what an unsigned run gives it
        return errors + [m for m, _, _ in ok]

    def _check_one(self, m: Any, server_round: int, role: str, seen: set[str], node: int) -> tuple[Verdict, str]:
        v = verify_content(m.content, self.lookup, run_id=self.run_id, server_round=server_round, role=role)
        if not v.ok:
            return v, v.reason
        if v.sender in seen:
            return v, f"second update from '{v.sender}' in round {server_round} (replay)"
        if self._node_of.get(v.sender, node) != node:
            return v, f"'{v.sender}' sent from node {node}, earlier from node {self._node_of[v.sender]} (reassigned)"
        why = check_reply(m.content, getattr(self.inner, "weighted_by_key", "num-examples"), train=role == CLIENT_ROLE)
        if why is None and role == CLIENT_ROLE and server_round in self._sent_arrays:
            sent = self._sent_arrays[server_round]
            got = without_dtypes(array_layout(m.content))
            why = None if got == sent else f"its arrays differ from the global model: {layout_difference(got, sent)}"
        return v, why or ""

    def _consistent(self, server_round: int, passed: list[tuple[Any, str, int]], train: bool) -> list[tuple[Any, str, int]]:
        """Keep the replies whose arrays (training) and metric names match the round's common layout."""
        layouts = [(array_layout(m.content) if train else (), metric_layout(m.content)) for m, _, _ in passed]
        common = pick_layout(layouts)
        ok = []
        for (m, sender, node), lay in zip(passed, layouts, strict=True):
            if lay == common:
                ok.append((m, sender, node))
                continue
            why = (f"its arrays differ from the round's other replies: {layout_difference(lay[0], common[0])}"
                   if lay[0] != common[0] else
                   f"its metrics {[k for k, _ in lay[1][1]][:6]} in '{lay[1][0][:40]}' differ from the round's other "
                   f"replies {[k for k, _ in common[1][1]][:6]} in '{common[1][0][:40]}'")
            self._reject(Rejection(server_round, node, sender, why, sender))
        return ok

    def _reject(self, r: Rejection) -> None:
        self.rejections.append(r)
        who = r.charged
        self.failures[who] += 1
        claim = f" (claims '{r.client}')" if r.client and r.client != who else ""
        log.warning("round %d: dropped the reply of %s%s: %s", r.server_round, who, claim, r.reason)
        if self.failures[who] >= self.report_after and who not in self.flagged:
            self.flagged.add(who)
            self._flagged_nodes.add(r.node_id)
            log.warning("%s failed verification %d times: reported as persistently failing", who, self.failures[who])

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        """Aggregate the verified, well-formed replies only."""
        return self.inner.aggregate_train(server_round, self.verify_replies(server_round, list(replies)))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Any]) -> Any:
        """Aggregate the verified, well-formed evaluation replies only (signed by clients as evaluations)."""
        return self.inner.aggregate_evaluate(server_round, self.verify_replies(server_round, list(replies), EVAL_ROLE))

    def summary(self) -> None:
        """Log the inner strategy's summary and the signing setup."""
        self.inner.summary()
        log.info("signed updates: server key %s (%s), run %s", self.server.fingerprint[:16], self.server.scheme,
                 self.run_id)

    def start(self, grid: Any, initial_arrays: Any, num_rounds: int = 3, timeout: float = 3600, **kw: Any) -> Any:
        """Run the inner strategy's round loop with this wrapper's hooks (Flower's ``Strategy.start``)."""
        from flwr.serverapp.strategy import Strategy

        return Strategy.start(self, grid, initial_arrays, num_rounds=num_rounds, timeout=timeout, **kw)  # type: ignore[arg-type]

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: accepted clients per round, rejections with reasons, flagged clients."""
        return {
            "run_id": self.run_id, "server_key": self.server.fingerprint, "scheme": self.server.scheme,
            "accepted": {str(k): v for k, v in self.accepted.items()},
            "rejections": [r.__dict__ for r in self.rejections], "flagged": sorted(self.flagged),
            **({"accepted_evaluate": {str(k): v for k, v in self.accepted_evaluate.items()}}
               if self.accepted_evaluate else {}),
        }
