"""Signing and verifying Flower message contents (a ``RecordDict``).

The signature travels inside the content as one extra ``ConfigRecord`` under :data:`SIG_KEY`
(ignored by Flower's strategies, which count only array and metric records). The digest covers
every other record of the content in order: array records (each tensor's name, dtype, shape,
serialization type and bytes), metric records (so the ``num-examples`` weight cannot be
inflated) and config records.

Verification never trusts the run id, round or key named in the signature record: the verifier
supplies the run id and round it expects, looks the key up in its own allowlist, recomputes the
digest, and checks the signature over :func:`~expertkit.federated.digest.binding_message`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expertkit.federated.digest import UpdateHasher, binding_message
from expertkit.federated.keys import Identity, PublicKey
from expertkit.federated.signing.base import get_signer

SIG_KEY = "expertkit.sig"
CLIENT_ROLE, SERVER_ROLE = "client-update", "global-model"
Lookup = Callable[[str, str], tuple[PublicKey | None, str]]  # (fingerprint, owner) -> (key, reason)
#: Seconds spent signing / verifying in this process (hashing included), for overhead reports.
CRYPTO_SECONDS: dict[str, float] = {"sign": 0.0, "verify": 0.0}


def digest_content(content: Any, alg: str = "sha3-256") -> bytes:
    """Canonical streamed digest of a ``RecordDict``, without its signature record."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    h = UpdateHasher(alg)
    for name, record in content.items():
        if name == SIG_KEY:
            continue
        if isinstance(record, ArrayRecord):
            h.section("arrays", name)
            for key, arr in record.items():
                h.tensor(key, f"{arr.stype}:{arr.dtype}", tuple(arr.shape), arr.data)
        elif isinstance(record, (MetricRecord, ConfigRecord)):
            h.section("metrics" if isinstance(record, MetricRecord) else "config", name)
            for key, value in record.items():
                h.scalar(key, value)
        else:  # pragma: no cover - Flower has no other record kinds
            raise TypeError(f"cannot hash record {name!r} of type {type(record).__name__}")
    return h.digest()


def sign_content(content: Any, identity: Identity, *, run_id: str, server_round: int, role: str,
                 alg: str = "sha3-256") -> None:
    """Sign ``content`` in place: add the signature record under :data:`SIG_KEY`."""
    from flwr.app import ConfigRecord

    started = time.perf_counter()
    if SIG_KEY in content:
        del content[SIG_KEY]
    digest = digest_content(content, alg)
    msg = binding_message(digest, alg=alg, run_id=run_id, server_round=server_round, sender=identity.owner, role=role)
    content[SIG_KEY] = ConfigRecord({
        "scheme": identity.scheme, "key": identity.fingerprint, "sender": identity.owner, "run-id": run_id,
        "round": int(server_round), "role": role, "alg": alg, "digest": digest, "signature": identity.sign(msg),
    })
    CRYPTO_SECONDS["sign"] += time.perf_counter() - started


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one message content."""

    ok: bool
    reason: str = ""
    sender: str = ""
    key: str = ""  # fingerprint named by the signature


def verify_content(content: Any, lookup: Lookup, *, run_id: str, server_round: int, role: str,
                   sender: str | None = None) -> Verdict:
    """Check the signature of ``content`` for the expected run, round and role.

    ``lookup(fingerprint, owner)`` resolves the signing key from the verifier's own allowlist.
    ``sender``, when given, is the only acceptable signer (e.g. ``"server"`` on a client).
    """
    started = time.perf_counter()
    try:
        return _verify(content, lookup, run_id=run_id, server_round=server_round, role=role, sender=sender)
    finally:
        CRYPTO_SECONDS["verify"] += time.perf_counter() - started


def _verify(content: Any, lookup: Lookup, *, run_id: str, server_round: int, role: str,
            sender: str | None) -> Verdict:
    if SIG_KEY not in content:
        return Verdict(False, "unsigned: the message has no signature record")
    rec = content[SIG_KEY]
    try:
        owner, fp, alg = str(rec["sender"]), str(rec["key"]), str(rec["alg"])
        signed_run, signed_round, signed_role = str(rec["run-id"]), int(rec["round"]), str(rec["role"])
        signature = bytes(rec["signature"])
    except (KeyError, TypeError, ValueError) as exc:
        return Verdict(False, f"malformed signature record ({exc})")
    if sender is not None and owner != sender:
        return Verdict(False, f"signed by '{owner}', expected '{sender}'", owner, fp)
    if signed_role != role:
        return Verdict(False, f"signature is for a {signed_role}, expected a {role}", owner, fp)
    if signed_run != run_id:
        return Verdict(False, f"signed for run '{signed_run}', this is run '{run_id}' (replay from another run)", owner, fp)
    if signed_round != server_round:
        return Verdict(False, f"signed for round {signed_round}, this is round {server_round} (replay)", owner, fp)
    key, why = lookup(fp, owner)
    if key is None:
        return Verdict(False, why, owner, fp)
    try:
        digest = digest_content(content, alg)
    except LookupError as exc:
        return Verdict(False, f"unknown digest algorithm ({exc})", owner, fp)
    msg = binding_message(digest, alg=alg, run_id=run_id, server_round=server_round, sender=owner, role=role)
    if not get_signer(key.scheme).verify(key.public, msg, signature):
        altered = digest != bytes(rec.get("digest", b""))
        what = "content altered after signing" if altered else "signature does not verify"
        return Verdict(False, f"bad {key.scheme} signature: {what}", owner, fp)
    return Verdict(True, "", owner, fp)


def static_lookup(keys: list[PublicKey]) -> Lookup:
    """A lookup over a fixed list of trusted keys (e.g. the server key a client trusts)."""
    by_fp = {k.fingerprint: k for k in keys}

    def lookup(fp: str, owner: str) -> tuple[PublicKey | None, str]:
        key = by_fp.get(fp)
        if key is None:
            return None, f"unknown key {fp[:16]} (not a trusted key)"
        if key.owner != owner:
            return None, f"key {fp[:16]} belongs to '{key.owner}', not to '{owner}'"
        return key, ""

    return lookup
