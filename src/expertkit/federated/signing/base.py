"""The signer protocol and the registry of signature schemes.

A scheme is one small object registered by name in :data:`SIGNERS`::

    signer = get_signer("ml-dsa-65")
    public, secret = signer.keygen()
    sig = signer.sign(secret, message)
    signer.verify(public, message, sig)  # True / False, never raises on a bad signature

Keys and signatures are plain ``bytes`` so they can be written to key files and carried in
Flower ``ConfigRecord`` values. ``verify`` returns ``False`` for a wrong signature, a malformed
signature or a malformed public key: a verifier must never crash on attacker-controlled bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from expertkit.registry import Registry


@runtime_checkable
class Signer(Protocol):
    """One signature scheme: key generation, signing and verification over bytes."""

    name: str
    family: str  # "ML-DSA", "FN-DSA", "SLH-DSA", "Ed25519", "hybrid"
    post_quantum: bool
    public_key_size: int  # bytes
    signature_size: int  # bytes (the maximum, for schemes with variable-length signatures)

    def keygen(self) -> tuple[bytes, bytes]:
        """A fresh ``(public_key, secret_key)`` pair."""
        ...

    def sign(self, secret_key: bytes, message: bytes) -> bytes:
        """The signature of ``message`` under ``secret_key``."""
        ...

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is valid for ``message`` under ``public_key``."""
        ...


@dataclass(frozen=True)
class SchemeInfo:
    """What the registry records about a scheme (for ``expertkit fl keys schemes`` and the docs)."""

    standard: str  # e.g. "FIPS 204"
    security_level: int  # NIST category 1..5 (Ed25519: classical ~128-bit, listed as 1)


SIGNERS: Registry[Signer] = Registry("signature scheme")


def get_signer(name: str) -> Signer:
    """The registered :class:`Signer` called ``name`` (unknown names suggest the nearest one)."""
    import expertkit.federated.signing  # noqa: F401  (registers every scheme)

    return SIGNERS.get(name)


def scheme_names() -> list[str]:
    """Every registered scheme name, sorted."""
    import expertkit.federated.signing  # noqa: F401

    return SIGNERS.names()
