"""Hybrid signatures: a classical and a post-quantum signature over the same message; both must verify.

A hybrid stays secure while either component is unbroken. Keys and signatures are the two
components with a 4-byte big-endian length prefix each. Registered names:
``ed25519+ml-dsa-44``, ``ed25519+ml-dsa-65``, ``ed25519+ml-dsa-87``, ``ed25519+fn-dsa-512``,
``ed25519+fn-dsa-1024``; :func:`hybrid` builds any other pair.
"""

from __future__ import annotations

import struct

from expertkit.federated.signing.base import SIGNERS, SchemeInfo, Signer


def pack(a: bytes, b: bytes) -> bytes:
    """``len(a) | a | len(b) | b`` with 4-byte big-endian lengths."""
    return struct.pack(">I", len(a)) + a + struct.pack(">I", len(b)) + b


def unpack(blob: bytes) -> tuple[bytes, bytes] | None:
    """The inverse of :func:`pack`; ``None`` for a malformed blob."""
    try:
        (n,) = struct.unpack_from(">I", blob, 0)
        a = blob[4 : 4 + n]
        (m,) = struct.unpack_from(">I", blob, 4 + n)
        b = blob[8 + n : 8 + n + m]
    except struct.error:
        return None
    if len(a) != n or len(b) != m or 8 + n + m != len(blob):
        return None
    return a, b


class HybridSigner:
    """``classical`` and ``post_quantum`` signatures over the same message (AND composition)."""

    family = "hybrid"
    post_quantum = True

    def __init__(self, classical: Signer, pq: Signer) -> None:
        self.classical, self.pq = classical, pq
        self.name = f"{classical.name}+{pq.name}"
        self.public_key_size = 8 + classical.public_key_size + pq.public_key_size
        self.signature_size = 8 + classical.signature_size + pq.signature_size

    def keygen(self) -> tuple[bytes, bytes]:
        """Both component key pairs, packed."""
        cp, cs = self.classical.keygen()
        pp, ps = self.pq.keygen()
        return pack(cp, pp), pack(cs, ps)

    def sign(self, secret_key: bytes, message: bytes) -> bytes:
        """Both component signatures, packed."""
        parts = unpack(secret_key)
        if parts is None:
            from expertkit.errors import ConfigError

            raise ConfigError(f"{self.name}: the secret key is not a packed hybrid key; generate it with this scheme.")
        return pack(self.classical.sign(parts[0], message), self.pq.sign(parts[1], message))

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """True only when both component signatures verify."""
        keys, sigs = unpack(public_key), unpack(signature)
        if keys is None or sigs is None:
            return False
        return self.classical.verify(keys[0], message, sigs[0]) and self.pq.verify(keys[1], message, sigs[1])


def hybrid(classical: str, pq: str) -> HybridSigner:
    """A hybrid of two registered schemes (not registered itself)."""
    return HybridSigner(SIGNERS.get(classical), SIGNERS.get(pq))


for _pq in ("ml-dsa-44", "ml-dsa-65", "ml-dsa-87", "fn-dsa-512", "fn-dsa-1024"):
    _h = hybrid("ed25519", _pq)
    SIGNERS.add(_h.name, _h, summary=f"hybrid: Ed25519 and {_pq}; both must verify", paper="composite signatures",
                info=SchemeInfo("hybrid", SIGNERS.entry(_pq).extra["info"].security_level))
