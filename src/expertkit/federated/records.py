"""Signing and verifying Flower message contents (a ``RecordDict``).

The signature travels inside the content as one extra ``ConfigRecord`` under :data:`SIG_KEY`
(ignored by Flower's strategies, which count only array and metric records). The digest covers
every other record of the content in order: array records (each tensor's name, dtype, shape,
serialization type and bytes), metric records (so the ``num-examples`` weight cannot be
inflated) and config records.

Verification never trusts the run id, round or key named in the signature record: the verifier
supplies the run id and round it expects, looks the key up in its own allowlist, recomputes the
digest, and checks the signature over :func:`~expertkit.federated.digest.binding_message`.
Everything in a received content is attacker-controlled until then: :func:`verify_content`
type-checks every field (:func:`parse_signature_record`, and the tensor fields while hashing)
and answers with a :class:`Verdict`, never an exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expertkit.federated.digest import DIGESTS, I64_RANGE, MalformedUpdateError, UpdateHasher, binding_message
from expertkit.federated.keys import Identity, PublicKey
from expertkit.federated.signing.base import get_signer

SIG_KEY = "expertkit.sig"
CLIENT_ROLE, SERVER_ROLE = "client-update", "global-model"
EVAL_ROLE = "client-evaluation"  # a client's evaluate reply (metrics only)
Lookup = Callable[[str, str], tuple[PublicKey | None, str]]  # (fingerprint, owner) -> (key, reason)
#: Seconds spent signing / verifying in this process (hashing included), for overhead reports.
CRYPTO_SECONDS: dict[str, float] = {"sign": 0.0, "verify": 0.0}


def digest_content(content: Any, alg: str = "sha3-256") -> bytes:
    """Canonical streamed digest of a ``RecordDict``, without its signature record.

    Raises :class:`~expertkit.federated.digest.MalformedUpdateError` for a record, tensor field or
    value of the wrong type or out of range (a negative dimension, a non-bytes tensor body, ...).
    """
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    h = UpdateHasher(alg)
    for name, record in content.items():
        if name == SIG_KEY:
            continue
        if isinstance(record, ArrayRecord):
            h.section("arrays", name)
            for key, arr in record.items():
                stype, dtype = getattr(arr, "stype", None), getattr(arr, "dtype", None)
                if not isinstance(stype, str) or not isinstance(dtype, str):
                    raise MalformedUpdateError(f"tensor '{str(key)[:80]}': stype and dtype must be strings, got "
                                               f"{type(stype).__name__} and {type(dtype).__name__}")
                h.tensor(key, f"{stype}:{dtype}", getattr(arr, "shape", None), getattr(arr, "data", None))
        elif isinstance(record, (MetricRecord, ConfigRecord)):
            h.section("metrics" if isinstance(record, MetricRecord) else "config", name)
            for key, value in record.items():
                h.scalar(key, value)
        else:
            raise MalformedUpdateError(f"record '{str(name)[:80]}' of type {type(record).__name__} (array, metric "
                                       "or config record expected)")
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


MAX_FIELD_CHARS = 256  # ids, fingerprints, run ids: longer is refused (it would only bloat logs and reports)


@dataclass(frozen=True)
class SigRecord:
    """The fields of a signature record, type-checked (see :func:`parse_signature_record`)."""

    scheme: str
    key: str
    sender: str
    run_id: str
    server_round: int
    role: str
    alg: str
    digest: bytes
    signature: bytes


_STRINGS = {"scheme": "scheme", "key": "key", "sender": "sender", "run-id": "run_id", "role": "role", "alg": "alg"}


def _kind(value: Any) -> str:
    return type(value).__name__


def parse_signature_record(rec: Any) -> SigRecord | str:
    """The signature record's fields, or the reason it is malformed (never raises).

    Every field must be present with its exact type: strings (at most :data:`MAX_FIELD_CHARS`)
    for scheme, key, sender, run id, role and digest algorithm; an ``int`` round in
    0 .. 2^63-1; ``bytes`` for the digest and the signature. Nothing is converted (``bytes(n)``
    of an attacker's integer would allocate ``n`` bytes).
    """
    from flwr.app import ConfigRecord

    if not isinstance(rec, ConfigRecord):
        return f"malformed signature record: {_kind(rec)} instead of a config record"
    try:
        fields: dict[str, Any] = {}
        for name, attr in _STRINGS.items():
            value = rec.get(name)
            if not isinstance(value, str):
                return f"malformed signature record: '{name}' is {_kind(value) if value is not None else 'missing'}, " \
                       "not a string"
            if len(value) > MAX_FIELD_CHARS:
                return f"malformed signature record: '{name}' is {len(value)} characters long (at most {MAX_FIELD_CHARS})"
            fields[attr] = value
        rnd = rec.get("round")
        if isinstance(rnd, bool) or not isinstance(rnd, int):
            return f"malformed signature record: 'round' is {_kind(rnd) if rnd is not None else 'missing'}, not an int"
        if not 0 <= rnd < I64_RANGE[1]:
            return "malformed signature record: 'round' is outside 0 .. 2^63-1"
        for name in ("digest", "signature"):
            value = rec.get(name)
            if not isinstance(value, bytes):
                return f"malformed signature record: '{name}' is {_kind(value) if value is not None else 'missing'}, " \
                       "not bytes"
            fields[name] = value
    except Exception as exc:  # a record whose accessors themselves fail  # noqa: BLE001
        return f"malformed signature record ({_kind(exc)})"
    if fields["alg"] not in DIGESTS:
        return f"unknown digest algorithm '{fields['alg'][:40]}' (known: {', '.join(DIGESTS)})"
    return SigRecord(server_round=rnd, **fields)


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one message content."""

    ok: bool
    reason: str = ""
    sender: str = ""  # the id the signature record claims: verified only when ``ok``
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
    try:
        rec = content.get(SIG_KEY) if SIG_KEY in content else None
    except Exception as exc:  # noqa: BLE001 - not a RecordDict at all
        return Verdict(False, f"malformed message content ({_kind(exc)})")
    if rec is None:
        return Verdict(False, "unsigned: the message has no signature record")
    parsed = parse_signature_record(rec)
    if isinstance(parsed, str):
        return Verdict(False, parsed)
    owner, fp = parsed.sender, parsed.key
    if sender is not None and owner != sender:
        return Verdict(False, f"signed by '{owner}', expected '{sender}'", owner, fp)
    if parsed.role != role:
        return Verdict(False, f"signature is for a {parsed.role}, expected a {role}", owner, fp)
    if parsed.run_id != run_id:
        return Verdict(False, f"signed for run '{parsed.run_id}', this is run '{run_id}' (replay from another run)",
                       owner, fp)
    if parsed.server_round != server_round:
        return Verdict(False, f"signed for round {parsed.server_round}, this is round {server_round} (replay)",
                       owner, fp)
    key, why = lookup(fp, owner)
    if key is None:
        return Verdict(False, why, owner, fp)
    try:
        digest = digest_content(content, parsed.alg)
    except MalformedUpdateError as exc:
        return Verdict(False, f"malformed update: {exc}", owner, fp)
    msg = binding_message(digest, alg=parsed.alg, run_id=run_id, server_round=server_round, sender=owner, role=role)
    if not get_signer(key.scheme).verify(key.public, msg, parsed.signature):
        what = "content altered after signing" if digest != parsed.digest else "signature does not verify"
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
