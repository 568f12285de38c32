"""SLH-DSA (FIPS 205, SPHINCS+) through ``pqcrypto``: SHA2 and SHAKE, 128/192/256, s and f.

Names: ``slh-dsa-sha2-128s`` ... ``slh-dsa-shake-256f``. ``s`` variants sign slowly with small
signatures, ``f`` variants sign fast with large ones. Stateless hash-based signatures: the
security rests on the hash function only.
"""

from __future__ import annotations

from expertkit.federated.signing.base import SIGNERS, SchemeInfo
from expertkit.federated.signing.mldsa import PqcryptoSigner

_LEVEL = {"128": 1, "192": 3, "256": 5}
for _hash in ("sha2", "shake"):
    for _bits in ("128", "192", "256"):
        for _kind in ("s", "f"):
            _name = f"slh-dsa-{_hash}-{_bits}{_kind}"
            SIGNERS.add(
                _name, PqcryptoSigner(_name, f"slh_dsa_{_hash}_{_bits}{_kind}", "SLH-DSA"),
                summary=f"SLH-DSA-{_hash.upper()}-{_bits}{_kind} (SPHINCS+), hash-based signatures, pqcrypto",
                paper="FIPS 205", info=SchemeInfo("FIPS 205", _LEVEL[_bits]),
            )
