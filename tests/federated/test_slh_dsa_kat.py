"""SLH-DSA known answers: NIST ACVP keyGen vectors (FIPS 205), one per parameter set for nine sets.

Source: usnistgov/ACVP-Server, gen-val/json-files/SLH-DSA-keyGen-FIPS205 (tcIds below). Each gives
SK.seed, SK.prf, PK.seed and the expected PK.root. Checked: the hashlib-only reference
(slh_reference.py) recomputes PK.root from the seeds; pqcrypto, given the NIST secret key
SK.seed|SK.prf|PK.seed|PK.root, signs a message whose signature verifies under the NIST public
key PK.seed|PK.root in pqcrypto and in the independent verifier (slh_verify_reference.py).
pqcrypto has no seeded key generation or deterministic signing, so its key generation and its
signatures cannot be compared byte for byte with the ACVP keyGen / sigGen answers.
"""

from __future__ import annotations

import pytest
from slh_reference import pk_root
from slh_verify_reference import verify as ref_verify

from expertkit.federated.signing import get_signer

ACVP = {  # variant: (tcId, SK.seed, SK.prf, PK.seed, PK.root)
    "sha2-128s": (1, "AA9CC7DCA491FC86BCB15A709A15E9B3", "905C800B6E2FB9B54B6B050EE5E4DE9A",
                  "FA5464D1C661FED38B2A51CA3EAE71BA", "CAE3D1865215E3D3850E8C1B8292BF42"),
    "shake-128s": (11, "ECD0A05696C2EC6BFE85B8B1B2022486", "BFD8732B1A42CEA236E9822AA9E724E6",
                   "37D664792198176C12E8121CCF69E684", "FCF6FFE2A04243DC3E8ED3EE6E44CDEF"),
    "sha2-128f": (21, "E2BDAA37C8CFFE5E8D5676C23267890C", "31441758F573285881CDC82AB911DD84",
                  "72DC8D26DF6EF708F4C41AF9FD04B65A", "8927927229891D47A60D67ECEF3D2C17"),
    "shake-128f": (31, "BBC74306F75DC2DAF7372B3C9841A4D6", "852C17B459F1692B8E9A1A0DACE5BA26",
                   "380C99304A0DDD32F344B95144E1FDEF", "60BBC2340E08770FB41A80A76CB08E34"),
    "sha2-192f": (61, "942DD588B0E0636060B1023BAF1DF36002B9D3C7256904F9",
                  "48596F0F2F17505585F022423433B3A3EF50977B98B01E8E",
                  "3E1D7DCF880C2EA3C8872122A996D5D6233BDFBD57FA641F",
                  "AD3C81BBE6778B1F788195131B3FCA91854FF3B075BF0009"),
    "shake-192f": (71, "3B7889D254F5AD87882DACBF3C58495667401601EC473979",
                   "7E935CBC27F3D7CD627B611CBEF7546C7F27751E18155CC4",
                   "266B6FB56BD0D922E0482700A4280CC1F07052804A8F46FD",
                   "ED3954BA0A9DA45D0D18867437777F60211BB9CD03A60D4B"),
    "sha2-256s": (81, "AE6CA8664EC0B9179D4E33C4DEFE01FCD589F60BA4502FE7416F2ACD96E139F1",
                  "3FDA2069147F44EABD5BBF29C74A20CB0F0CC2A12BAB5834B773530AF504900A",
                  "134D5ED3C60B46344A84A45D4683B1AC55FB22886BA9478EA9CA93F27B9AA2C2",
                  "7C5C9908F086E57956F85DE84B438EF1F082CD176DFF3C5B8BE710BC8699A143"),
    "sha2-256f": (102, "A59E84157DF8381F59BBF76A83F825DD35A265B4313797EE500893447EF6124E",
                  "6A3B8B9B0B5F9C5656B16C01B89A6C7B9DE486D043D165DDEF4F6E5AECD950B2",
                  "5254430EBD95839F46A4E5EAA8025A549888782604A508D56FDBB68B637E91F9",
                  "66C9FB4FEDB05D65121667536879FE18E5C55D164CDA594FA42A2A0E0195D717"),
    "shake-256f": (111, "D50F77713CF59193FE5F10B8AAF1876B0D3E7E4181ED3FAE3468762698017584",
                   "36C22B81940403157446D44F04C09FD28DF72C6D4021B271544055783081B7C0",
                   "46D2AC50751A0C71EC850BB7D16A679A66901EEE05389D4615940EFD89C0182F",
                   "DEBCFBF3527CC768C5EC6CB5B6CC10A674390745D8612D0920187DF658D3B7EF"),
}


@pytest.mark.parametrize("variant", list(ACVP))
def test_acvp_keygen_vector(variant):
    _, sk_seed, sk_prf, pk_seed, root = (bytes.fromhex(x) if isinstance(x, str) else x for x in ACVP[variant])
    assert pk_root(variant, sk_seed, pk_seed) == root  # the reference reproduces NIST's PK.root
    signer, msg = get_signer(f"slh-dsa-{variant}"), b"expertkit ACVP key"
    pk, sk = pk_seed + root, sk_seed + sk_prf + pk_seed + root
    sig = signer.sign(sk, msg)
    assert signer.verify(pk, msg, sig) and ref_verify(variant, pk, b"\x00\x00" + msg, sig)
    wrong_root = bytes([root[0] ^ 1]) + root[1:]
    assert not signer.verify(pk_seed + wrong_root, msg, sig)
