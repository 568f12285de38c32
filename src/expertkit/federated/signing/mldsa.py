"""ML-DSA (FIPS 204, Dilithium) through ``pqcrypto``: ml-dsa-44, ml-dsa-65, ml-dsa-87.

Pure mode with an empty context: the signed message already carries the expertkit domain tag
(see :mod:`expertkit.federated.digest`). Signatures are checked against the ``cryptography``
package's independent ML-DSA in the tests.
"""

from __future__ import annotations

import importlib
from typing import Any

from expertkit.federated.signing.base import SIGNERS, SchemeInfo


class PqcryptoSigner:
    """A ``pqcrypto.sign.<module>`` scheme behind the :class:`Signer` protocol."""

    def __init__(self, name: str, module: str, family: str) -> None:
        self.name = name
        self.family = family
        self.post_quantum = True
        self._module_name = module
        mod = self._mod()
        self.public_key_size = int(mod.PUBLIC_KEY_SIZE)
        self.signature_size = int(mod.SIGNATURE_SIZE)
        self.secret_key_size = int(mod.SECRET_KEY_SIZE)

    def _mod(self) -> Any:
        return importlib.import_module(f"pqcrypto.sign.{self._module_name}")

    def keygen(self) -> tuple[bytes, bytes]:
        """A fresh ``(public_key, secret_key)`` pair."""
        pk, sk = self._mod().keygen()
        return bytes(pk), bytes(sk)

    def sign(self, secret_key: bytes, message: bytes) -> bytes:
        """The signature of ``message``."""
        return bytes(self._mod().sign(secret_key, message))

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is valid; malformed inputs are ``False``."""
        if len(public_key) != self.public_key_size or len(signature) != self.signature_size:
            return False
        try:
            self._mod().verify(public_key, message, signature)
        except Exception:  # pqcrypto raises InvalidSignatureError (and ValueError on bad lengths)
            return False
        return True


_LEVEL = {"44": 2, "65": 3, "87": 5}
for _p in ("44", "65", "87"):
    SIGNERS.add(
        f"ml-dsa-{_p}", PqcryptoSigner(f"ml-dsa-{_p}", f"ml_dsa_{_p}", "ML-DSA"),
        summary=f"ML-DSA-{_p} (CRYSTALS-Dilithium), lattice signatures, pqcrypto", paper="FIPS 204",
        info=SchemeInfo("FIPS 204", _LEVEL[_p]),
    )


class OpenSslMlDsaSigner:
    """ML-DSA through the ``cryptography`` package (OpenSSL): same public keys and signatures as
    FIPS 204 / pqcrypto, so either side can verify the other; the secret key is the 32-byte seed."""

    family = "ML-DSA"
    post_quantum = True

    def __init__(self, level: str) -> None:
        self.level = level
        self.name = f"ml-dsa-{level}-openssl"
        ref = SIGNERS.get(f"ml-dsa-{level}")
        self.public_key_size, self.signature_size = ref.public_key_size, ref.signature_size
        self.secret_key_size = 32

    def _cls(self, kind: str) -> Any:
        from cryptography.hazmat.primitives.asymmetric import mldsa

        return getattr(mldsa, f"MLDSA{self.level}{kind}Key")

    def keygen(self) -> tuple[bytes, bytes]:
        """A fresh ``(public_key, seed)`` pair."""
        import os

        seed = os.urandom(32)
        sk = self._cls("Private").from_seed_bytes(seed)
        return sk.public_key().public_bytes_raw(), seed

    def sign(self, secret_key: bytes, message: bytes) -> bytes:
        """The signature of ``message``."""
        return self._cls("Private").from_seed_bytes(secret_key).sign(message)

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is valid; malformed inputs are ``False``."""
        from cryptography.exceptions import InvalidSignature

        if len(public_key) != self.public_key_size or len(signature) != self.signature_size:
            return False
        try:
            self._cls("Public").from_public_bytes(public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


def _has_openssl_mldsa() -> bool:
    try:
        from cryptography.hazmat.primitives.asymmetric import mldsa

        mldsa.MLDSA44PrivateKey.from_seed_bytes(bytes(32))
    except Exception:  # an OpenSSL build without ML-DSA
        return False
    return True


if _has_openssl_mldsa():
    for _p in ("44", "65", "87"):
        SIGNERS.add(f"ml-dsa-{_p}-openssl", OpenSslMlDsaSigner(_p),
                    summary=f"ML-DSA-{_p} through OpenSSL (cryptography); interoperable with ml-dsa-{_p}",
                    paper="FIPS 204", info=SchemeInfo("FIPS 204", _LEVEL[_p]))
