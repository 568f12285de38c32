"""The ClientApp side: a Flower mod that verifies the server-signed global model and signs replies.

``SigningMod(identity, server_keys)`` wraps a ClientApp's message path (``ClientApp(mods=[mod])``):

* on an incoming ``train`` or ``evaluate`` message it checks the server's signature over the
  whole content (global model arrays and config) against the server keys it trusts, and that the
  round does not go back in time within a run (a replayed old global model). A failure returns an
  error reply and the local training never runs on an unverified model;
* on the outgoing ``train`` reply it signs the content (arrays and metrics) bound to the run id
  and round the server signed, and to this client's id; an ``evaluate`` reply (metrics) is
  signed the same way in the ``client-evaluation`` role.

The incoming message is attacker-controlled until its signature verifies: a signature record of
the wrong type or with fields of the wrong type, and a malformed model, give an error reply with
the reason, never an exception.
"""

from __future__ import annotations

from typing import Any

from expertkit.federated.keys import Identity, PublicKey
from expertkit.federated.records import (
    CLIENT_ROLE,
    EVAL_ROLE,
    SERVER_ROLE,
    SIG_KEY,
    parse_signature_record,
    sign_content,
    static_lookup,
    verify_content,
)

STATE_KEY = "expertkit.fl"
ERROR_CODE = 4711  # Flower error code used for a refused (unverified) server message


class SigningMod:
    """Flower client mod: verify the server-signed model, sign the training reply."""

    def __init__(self, identity: Identity, server_keys: list[PublicKey] | None, *, alg: str = "sha3-256") -> None:
        """``server_keys=None`` skips the server check (then the run id and round are taken unverified)."""
        self.identity = identity
        self.server_keys = server_keys
        self.lookup = static_lookup(server_keys) if server_keys is not None else None
        self.alg = alg

    def _refuse(self, msg: Any, reason: str) -> Any:
        from flwr.app import Error, Message

        return Message(Error(code=ERROR_CODE, reason=f"{self.identity.owner}: refused server message: {reason}"),
                       reply_to=msg)

    def __call__(self, msg: Any, ctxt: Any, call_next: Any) -> Any:
        """Verify, run the inner app, sign its reply."""
        from flwr.app import ConfigRecord, MessageType

        mtype = msg.metadata.message_type
        if mtype not in (MessageType.TRAIN, MessageType.EVALUATE):
            return call_next(msg, ctxt)
        rec = msg.content.get(SIG_KEY) if msg.has_content() else None
        if rec is None:
            return self._refuse(msg, "the server message is not signed")
        parsed = parse_signature_record(rec)
        if isinstance(parsed, str):
            return self._refuse(msg, parsed)
        run_id, server_round = parsed.run_id, parsed.server_round
        if self.lookup is not None:
            verdict = verify_content(msg.content, self.lookup, run_id=run_id, server_round=server_round,
                                     role=SERVER_ROLE, sender="server")
            if not verdict.ok:
                return self._refuse(msg, verdict.reason)
        state = ctxt.state.get(STATE_KEY) if STATE_KEY in ctxt.state else None
        if state is not None and state["run-id"] == run_id and server_round < int(state["round"]):
            return self._refuse(msg, f"round {server_round} after round {state['round']} (replayed global model)")
        ctxt.state[STATE_KEY] = ConfigRecord({"run-id": run_id, "round": server_round})
        del msg.content[SIG_KEY]  # the inner app sees exactly what an unsigned run would
        reply = call_next(msg, ctxt)
        if not reply.has_error():
            role = CLIENT_ROLE if mtype == MessageType.TRAIN else EVAL_ROLE
            sign_content(reply.content, self.identity, run_id=run_id, server_round=server_round, role=role, alg=self.alg)
        return reply
