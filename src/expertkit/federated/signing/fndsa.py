"""FN-DSA (draft FIPS 206, FALCON) through ``py-fn-dsa``: fn-dsa-512 and fn-dsa-1024.

Keys are the library's encoded verifying / signing keys; signatures are the library's fixed-length,
zero-padded encoding (:attr:`signature_size` bytes). Pure mode (``HASH_ID_RAW``), empty context.
An independent pure-Python verifier for cross-checking (slow, never used to accept updates) is
:mod:`expertkit.federated.signing.fndsa_ref`.
"""

from __future__ import annotations

from expertkit.federated.signing.base import SIGNERS, SchemeInfo


class FnDsaSigner:
    """FN-DSA with degree ``2**logn`` behind the :class:`Signer` protocol."""

    family = "FN-DSA"
    post_quantum = True

    def __init__(self, name: str, logn: int) -> None:
        import py_fn_dsa

        self.name = name
        self.logn = logn
        self.public_key_size = py_fn_dsa._calc_vrfy_key_size(logn)
        self.signature_size = py_fn_dsa._calc_signature_size(logn)
        self.secret_key_size = py_fn_dsa._calc_sign_key_size(logn)

    def keygen(self) -> tuple[bytes, bytes]:
        """A fresh ``(public_key, secret_key)`` pair."""
        import py_fn_dsa

        vk, sk = py_fn_dsa.keygen(self.logn)
        return vk.key_data, sk.key_data

    def sign(self, secret_key: bytes, message: bytes) -> bytes:
        """The signature of ``message``."""
        import py_fn_dsa

        return py_fn_dsa.sign(py_fn_dsa.SigningKey(self.logn, secret_key), bytes(message))

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is valid; malformed inputs are ``False``."""
        import py_fn_dsa

        if len(public_key) != self.public_key_size or not 0 < len(signature) <= self.signature_size:
            return False
        try:
            return bool(py_fn_dsa.verify(py_fn_dsa.VerifyKey(self.logn, public_key), bytes(signature), bytes(message)))
        except (ValueError, TypeError):
            return False


for _n, _logn, _level in (("512", 9, 1), ("1024", 10, 5)):
    SIGNERS.add(
        f"fn-dsa-{_n}", FnDsaSigner(f"fn-dsa-{_n}", _logn),
        summary=f"FN-DSA-{_n} (FALCON), NTRU-lattice signatures, py-fn-dsa", paper="draft FIPS 206",
        info=SchemeInfo("draft FIPS 206", _level),
    )
