"""Ed25519 (RFC 8032) through ``cryptography``: the classical, not post-quantum, baseline."""

from __future__ import annotations

from expertkit.federated.signing.base import SIGNERS, SchemeInfo


class Ed25519Signer:
    """Ed25519 with raw 32-byte keys and 64-byte signatures."""

    name = "ed25519"
    family = "Ed25519"
    post_quantum = False
    public_key_size = 32
    signature_size = 64
    secret_key_size = 32

    def keygen(self) -> tuple[bytes, bytes]:
        """A fresh ``(public_key, secret_key)`` pair (raw encodings)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        sk = Ed25519PrivateKey.generate()
        return sk.public_key().public_bytes_raw(), sk.private_bytes_raw()

    def sign(self, secret_key: bytes, message: bytes) -> bytes:
        """The (deterministic) signature of ``message``."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(secret_key).sign(message)

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is valid; malformed inputs are ``False``."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if len(public_key) != 32 or len(signature) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


SIGNERS.add("ed25519", Ed25519Signer(), summary="Ed25519, classical elliptic-curve baseline (not post-quantum)",
            paper="RFC 8032", info=SchemeInfo("RFC 8032", 1))
