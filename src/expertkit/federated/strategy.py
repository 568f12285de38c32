"""The ServerApp side: a strategy wrapper that verifies every training reply before aggregation.

``SignedStrategy(inner, trust, server)`` wraps any Flower message-API strategy (FedAvg, FedProx,
FedAdam, ...). It

* signs every outgoing ``train`` / ``evaluate`` message (global model and config) with the
  server identity, bound to this run id and the round;
* verifies every ``train`` reply against the allowlist for this run and round, and rejects
  duplicates within a round and a client id that moves to another node; rejected replies are
  dropped, logged and kept in :attr:`rejections` with the reason;
* hands only verified replies to the inner strategy, so an unverified update never touches the
  global model; with no verified reply the global model stays as it was;
* counts failures per client id; after ``report_after`` failures the client is listed in
  :attr:`flagged` (and, with ``exclude_flagged``, no longer sent work).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from expertkit.federated.keys import Identity, TrustStore
from expertkit.federated.records import CLIENT_ROLE, SERVER_ROLE, Lookup, sign_content, verify_content

log = logging.getLogger("expertkit.federated")


@dataclass(frozen=True)
class Rejection:
    """A training reply that was dropped before aggregation."""

    server_round: int
    node_id: int
    client: str  # the client id the reply claimed ("" when it claimed none)
    reason: str


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
        self.failures: Counter[str] = Counter()
        self.flagged: set[str] = set()
        self._node_of: dict[str, int] = {}
        self._flagged_nodes: set[int] = set()

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
        """The inner strategy's train messages, signed."""
        return self._sign(self.inner.configure_train(server_round, arrays, config, grid), server_round)

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        """The inner strategy's evaluate messages, signed."""
        return self._sign(self.inner.configure_evaluate(server_round, arrays, config, grid), server_round)

    # -- clients -> server ----------------------------------------------------------------
    def verify_replies(self, server_round: int, replies: Iterable[Any]) -> list[Any]:
        """The replies that pass verification; the others are recorded in :attr:`rejections`."""
        from expertkit.federated.records import SIG_KEY

        ok: list[Any] = []
        seen: set[str] = set()
        for m in replies:
            if m.has_error():  # no content: the inner strategy logs and skips it
                ok.append(m)
                continue
            node = int(m.metadata.src_node_id)
            v = verify_content(m.content, self.lookup, run_id=self.run_id, server_round=server_round, role=CLIENT_ROLE)
            reason = v.reason
            if v.ok and v.sender in seen:
                reason = f"second update from '{v.sender}' in round {server_round} (replay)"
            elif v.ok and self._node_of.get(v.sender, node) != node:
                reason = f"'{v.sender}' sent from node {node}, earlier from node {self._node_of[v.sender]} (reassigned)"
            if reason:
                self._reject(Rejection(server_round, node, v.sender, reason))
                continue
            seen.add(v.sender)
            self._node_of[v.sender] = node
            del m.content[SIG_KEY]  # the inner strategy sees exactly what an unsigned run gives it
            ok.append(m)
        self.accepted[server_round] = sorted(seen)
        return ok

    def _reject(self, r: Rejection) -> None:
        self.rejections.append(r)
        who = r.client or f"node {r.node_id}"
        self.failures[who] += 1
        log.warning("round %d: dropped the update of %s: %s", r.server_round, who, r.reason)
        if self.failures[who] >= self.report_after and who not in self.flagged:
            self.flagged.add(who)
            self._flagged_nodes.add(r.node_id)
            log.warning("%s failed verification %d times: reported as persistently failing", who, self.failures[who])

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        """Aggregate the verified replies only."""
        return self.inner.aggregate_train(server_round, self.verify_replies(server_round, list(replies)))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Any]) -> Any:
        """Evaluation replies carry metrics only and never touch the model: passed through."""
        return self.inner.aggregate_evaluate(server_round, replies)

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
        }
