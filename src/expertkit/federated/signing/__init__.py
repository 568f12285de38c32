"""Signature schemes for federated updates, one module per family, registered by name.

* ``ml-dsa-44/65/87`` (FIPS 204, Dilithium; :mod:`.mldsa`)
* ``fn-dsa-512/1024`` (draft FIPS 206, FALCON; :mod:`.fndsa`)
* ``slh-dsa-{sha2,shake}-{128,192,256}{s,f}`` (FIPS 205, SPHINCS+; :mod:`.slhdsa`)
* ``ed25519`` (RFC 8032, the classical baseline; :mod:`.ed25519`)
* ``ed25519+<pq>`` hybrids, both must verify (:mod:`.hybrid`)
"""

from expertkit.federated.signing.base import SIGNERS, SchemeInfo, Signer, get_signer, scheme_names
from expertkit.federated.signing import ed25519, mldsa, fndsa, slhdsa  # noqa: E402,F401  (register)
from expertkit.federated.signing import hybrid  # noqa: E402,F401  (needs the others)

__all__ = ["SIGNERS", "SchemeInfo", "Signer", "get_signer", "scheme_names"]
