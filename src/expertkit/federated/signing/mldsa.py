"""ML-DSA (FIPS 204, Dilithium): ml-dsa-44, ml-dsa-65, ml-dsa-87.

``ml-dsa-NN`` (:class:`MlDsaSigner`) signs with OpenSSL's ML-DSA through the ``cryptography``
package where it is available and with ``pqcrypto`` (PQClean's reference code) otherwise;
``ml-dsa-NN-openssl`` and ``ml-dsa-NN-pqcrypto`` name one implementation each (the benchmarks
and the cross-checks in the tests). Pure mode with an empty context: the signed message already
carries the expertkit domain tag (see :mod:`expertkit.federated.digest`).
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
SEED_BYTES = 32  # a FIPS 204 private key seed (xi)


class OpenSslMlDsaSigner:
    """ML-DSA through the ``cryptography`` package (OpenSSL): same public keys and signatures as
    FIPS 204 / pqcrypto, so either side can verify the other; the secret key is the 32-byte seed."""

    family = "ML-DSA"
    post_quantum = True

    def __init__(self, level: str, reference: PqcryptoSigner) -> None:
        self.level = level
        self.name = f"ml-dsa-{level}-openssl"
        self.public_key_size, self.signature_size = reference.public_key_size, reference.signature_size
        self.secret_key_size = SEED_BYTES

    def _cls(self, kind: str) -> Any:
        from cryptography.hazmat.primitives.asymmetric import mldsa

        return getattr(mldsa, f"MLDSA{self.level}{kind}Key")

    def keygen(self) -> tuple[bytes, bytes]:
        """A fresh ``(public_key, seed)`` pair."""
        import os

        seed = os.urandom(SEED_BYTES)
        sk = self._cls("Private").from_seed_bytes(seed)
        return sk.public_key().public_bytes_raw(), seed

    def sign(self, secret_key: bytes, message: bytes) -> bytes:
        """The signature of ``message``."""
        if len(secret_key) != SEED_BYTES:
            from expertkit.errors import ConfigError

            raise ConfigError(f"{self.name}: the secret key has {len(secret_key)} bytes, a {SEED_BYTES}-byte FIPS 204 "
                              f"seed is needed; use scheme ml-dsa-{self.level} for an expanded (pqcrypto) key.")
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


def has_openssl_mldsa() -> bool:
    """Whether ``cryptography`` is linked to an OpenSSL with ML-DSA (OpenSSL 3.5 or later)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import mldsa

        mldsa.MLDSA44PrivateKey.from_seed_bytes(bytes(SEED_BYTES))
    except Exception:  # an older cryptography, or an OpenSSL build without ML-DSA  # noqa: BLE001
        return False
    return True


class MlDsaSigner:
    """``ml-dsa-NN``: OpenSSL's ML-DSA when ``cryptography`` has it, else pqcrypto (PQClean's reference code).

    Both are FIPS 204 with the same public keys and signatures. OpenSSL signs about 18x faster
    here (docs/benchmarks.md), so it is the default. Secret keys: new ones are the 32-byte FIPS 204
    seed (OpenSSL), or pqcrypto's expanded key when OpenSSL has no ML-DSA; key files written by
    earlier versions hold the expanded key and keep working: :meth:`sign` picks the
    implementation by the key's length. A seed cannot be used without OpenSSL (pqcrypto has no
    seeded key generation).
    """

    family = "ML-DSA"
    post_quantum = True

    def __init__(self, level: str, reference: PqcryptoSigner, fast: OpenSslMlDsaSigner | None) -> None:
        self.level, self.name = level, f"ml-dsa-{level}"
        self.reference, self.fast = reference, fast
        self.backend = "openssl" if fast is not None else "pqcrypto"
        self.public_key_size, self.signature_size = reference.public_key_size, reference.signature_size
        self.secret_key_size = SEED_BYTES if fast is not None else reference.secret_key_size

    def keygen(self) -> tuple[bytes, bytes]:
        """A fresh ``(public_key, secret_key)`` pair: the seed with OpenSSL, else pqcrypto's expanded key."""
        return (self.fast or self.reference).keygen()

    def sign(self, secret_key: bytes, message: bytes) -> bytes:
        """The signature of ``message`` under a seed (OpenSSL) or an expanded key (pqcrypto)."""
        from expertkit.errors import ConfigError

        if len(secret_key) == SEED_BYTES:
            if self.fast is None:
                raise ConfigError(f"{self.name}: this key is a 32-byte FIPS 204 seed, which needs the cryptography "
                                  "package with OpenSSL 3.5+ (ML-DSA); install it, or generate a new key here.")
            return self.fast.sign(secret_key, message)
        if len(secret_key) == self.reference.secret_key_size:
            return self.reference.sign(secret_key, message)
        raise ConfigError(f"{self.name}: a secret key of {len(secret_key)} bytes; expected a {SEED_BYTES}-byte seed "
                          f"or a {self.reference.secret_key_size}-byte expanded key.")

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is valid (OpenSSL when available); malformed inputs are ``False``."""
        return (self.fast or self.reference).verify(public_key, message, signature)


HAS_OPENSSL_MLDSA = has_openssl_mldsa()
for _p in ("44", "65", "87"):
    _ref = PqcryptoSigner(f"ml-dsa-{_p}-pqcrypto", f"ml_dsa_{_p}", "ML-DSA")
    _fast = OpenSslMlDsaSigner(_p, _ref) if HAS_OPENSSL_MLDSA else None
    _info = SchemeInfo("FIPS 204", _LEVEL[_p])
    SIGNERS.add(f"ml-dsa-{_p}", MlDsaSigner(_p, _ref, _fast), paper="FIPS 204", info=_info,
                summary=f"ML-DSA-{_p} (CRYSTALS-Dilithium), lattice signatures; OpenSSL through cryptography "
                        f"{'(in use)' if _fast else '(not available here: pqcrypto in use)'}, else pqcrypto")
    SIGNERS.add(f"ml-dsa-{_p}-pqcrypto", _ref, paper="FIPS 204", info=_info,
                summary=f"ML-DSA-{_p} through pqcrypto (PQClean reference code); interoperable with ml-dsa-{_p}")
    if _fast is not None:
        SIGNERS.add(f"ml-dsa-{_p}-openssl", _fast, paper="FIPS 204", info=_info,
                    summary=f"ML-DSA-{_p} through OpenSSL (cryptography) only; interoperable with ml-dsa-{_p}")
