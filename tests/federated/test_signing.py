"""Signers: round trips for every scheme, and a known-answer or cross-implementation check per family."""

from __future__ import annotations

import hashlib

import pytest

from expertkit.errors import UnknownNameError
from expertkit.federated.signing import SIGNERS, Signer, get_signer, scheme_names

MSG = b"expertkit federated update"


def test_every_listed_scheme_is_registered():
    names = set(scheme_names())
    want = {"ml-dsa-44", "ml-dsa-65", "ml-dsa-87", "fn-dsa-512", "fn-dsa-1024", "ed25519", "ed25519+ml-dsa-65"}
    want |= {f"slh-dsa-{h}-{b}{k}" for h in ("sha2", "shake") for b in (128, 192, 256) for k in "sf"}
    assert want <= names
    with pytest.raises(UnknownNameError, match="ml-dsa-65"):
        get_signer("ml-dsa-66")


@pytest.mark.parametrize("name", [n for n in sorted(SIGNERS.names()) if not n.endswith("s") or "-128" in n])
def test_sign_verify_and_reject(name):
    s = get_signer(name)
    assert isinstance(s, Signer)
    pk, sk = s.keygen()
    sig = s.sign(sk, MSG)
    assert len(pk) == s.public_key_size and len(sig) <= s.signature_size
    assert s.verify(pk, MSG, sig)
    assert not s.verify(pk, MSG + b"!", sig)
    flipped = bytearray(sig)
    flipped[len(sig) // 2] ^= 0x01
    assert not s.verify(pk, MSG, bytes(flipped))
    other_pk, _ = s.keygen()
    assert not s.verify(other_pk, MSG, sig)
    assert not s.verify(pk[:-1], MSG, sig)  # malformed inputs are False, never an exception
    assert not s.verify(pk, MSG, sig[:-3])


@pytest.mark.parametrize("level", ["44", "65", "87"])
def test_ml_dsa_pqcrypto_reference_cross_verifies_with_cryptography(level):
    """pqcrypto (PQClean's reference code) and the `cryptography` package's ML-DSA (OpenSSL) accept
    each other's signatures: pqcrypto is the independent check of the default OpenSSL signer."""
    from cryptography.hazmat.primitives.asymmetric import mldsa

    priv_cls = getattr(mldsa, f"MLDSA{level}PrivateKey")
    pub_cls = getattr(mldsa, f"MLDSA{level}PublicKey")
    ref = get_signer(f"ml-dsa-{level}-pqcrypto")
    pk, sk = ref.keygen()
    pub_cls.from_public_bytes(pk).verify(ref.sign(sk, MSG), MSG)  # raises InvalidSignature on failure
    theirs = priv_cls.generate()
    their_pk = theirs.public_key().public_bytes_raw()
    assert ref.verify(their_pk, MSG, theirs.sign(MSG))
    assert not ref.verify(their_pk, MSG + b"x", theirs.sign(MSG))


RFC8032 = [  # RFC 8032 section 7.1, tests 1 and 2: (secret, public, message, signature)
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
]


@pytest.mark.parametrize("sk,pk,msg,sig", RFC8032)
def test_ed25519_known_answers(sk, pk, msg, sig):
    s = get_signer("ed25519")
    assert s.sign(bytes.fromhex(sk), bytes.fromhex(msg)) == bytes.fromhex(sig)
    assert s.verify(bytes.fromhex(pk), bytes.fromhex(msg), bytes.fromhex(sig))


@pytest.mark.parametrize("name,logn,pk_size,sig_max", [("fn-dsa-512", 9, 897, 666), ("fn-dsa-1024", 10, 1793, 1280)])
def test_fn_dsa_encodings_follow_the_standard(name, logn, pk_size, sig_max):
    """The encodings c-fn-dsa fixes (the cross-implementation and known-answer checks are in
    test_fndsa_ref.py).

    Verifying key: header byte ``logn`` and 897 / 1793 bytes; signing key: header ``0x50 + logn``
    and ends with SHAKE256(verifying key) (64 bytes); signature: header ``0x30 + logn``, at most
    666 / 1280 bytes, with a 40-byte nonce that differs between two signatures of one message.
    """
    s = get_signer(name)
    pk, sk = s.keygen()
    assert (len(pk), pk[0], sk[0]) == (pk_size, logn, 0x50 + logn)
    assert sk[-64:] == hashlib.shake_256(pk).digest(64)
    a, b = s.sign(sk, MSG), s.sign(sk, MSG)
    assert a[0] == b[0] == 0x30 + logn and len(a) <= sig_max
    assert a[1:41] != b[1:41] and s.verify(pk, MSG, a) and s.verify(pk, MSG, b)


SLH_SIZES = {"128s": (32, 7856), "128f": (32, 17088), "192s": (48, 16224), "192f": (48, 35664),
             "256s": (64, 29792), "256f": (64, 49856)}  # FIPS 205 table 2: (public key, signature)


@pytest.mark.parametrize("name", [f"slh-dsa-{h}-{p}" for h in ("sha2", "shake") for p in SLH_SIZES])
def test_slh_dsa_sizes_and_key_layout(name):
    """FIPS 205 sizes, and the key layout SK = SK.seed | SK.prf | PK.seed | PK.root with PK = PK.seed | PK.root."""
    s = get_signer(name)
    pk_size, sig_size = SLH_SIZES[name.rsplit("-", 1)[1]]
    assert (s.public_key_size, s.signature_size) == (pk_size, sig_size)
    if name.endswith("f"):
        pk, sk = s.keygen()
        assert len(sk) == 2 * pk_size and sk[pk_size:] == pk


@pytest.mark.parametrize("name", [f"slh-dsa-{h}-{p}f" for h in ("sha2", "shake") for p in (128, 192, 256)])
def test_slh_dsa_public_root_matches_an_independent_fips205_keygen(name):
    """PK.root recomputed from SK.seed and PK.seed by tests/federated/slh_reference.py (hashlib only)."""
    from slh_reference import pk_root

    pk, sk = get_signer(name).keygen()
    n = len(pk) // 2
    variant = name.removeprefix("slh-dsa-")
    assert pk_root(variant, sk[:n], pk[:n]) == pk[n:]
    assert pk_root(variant, bytes([sk[0] ^ 1]) + sk[1:n], pk[:n]) != pk[n:]


def test_hybrid_needs_both_signatures():
    from expertkit.federated.signing.hybrid import pack, unpack

    h = get_signer("ed25519+ml-dsa-65")
    pk, sk = h.keygen()
    sig = h.sign(sk, MSG)
    c_sig, q_sig = unpack(sig)
    c2, q2 = unpack(h.sign(h.keygen()[1], MSG))  # valid components under another key pair
    assert h.verify(pk, MSG, sig)
    assert not h.verify(pk, MSG, pack(c_sig, q2))  # post-quantum half wrong
    assert not h.verify(pk, MSG, pack(c2, q_sig))  # classical half wrong
    assert not h.verify(pk, MSG, c_sig)  # a bare classical signature is not a hybrid one
    assert unpack(b"\x00\x00") is None


@pytest.mark.parametrize("level", ["44", "65", "87"])
def test_default_ml_dsa_signs_with_openssl_and_interoperates_with_pqcrypto(level):
    """``ml-dsa-NN`` is OpenSSL's ML-DSA (a 32-byte FIPS 204 seed as secret key, which pqcrypto cannot
    take), checked against the pqcrypto reference both ways; a pqcrypto expanded key (key files of
    earlier versions) still signs through the default scheme."""
    from expertkit.federated.signing.mldsa import MlDsaSigner

    fast, ref = get_signer(f"ml-dsa-{level}"), get_signer(f"ml-dsa-{level}-pqcrypto")
    assert isinstance(fast, MlDsaSigner) and fast.backend == "openssl"
    pk, seed = fast.keygen()
    assert len(seed) == fast.secret_key_size == 32 and len(pk) == ref.public_key_size
    assert ref.verify(pk, MSG, fast.sign(seed, MSG)) and get_signer(f"ml-dsa-{level}-openssl").verify(
        pk, MSG, fast.sign(seed, MSG))
    pk2, expanded = ref.keygen()
    assert len(expanded) == ref.secret_key_size > 32
    assert fast.verify(pk2, MSG, ref.sign(expanded, MSG)) and not fast.verify(pk2, MSG + b"!", ref.sign(expanded, MSG))
    assert ref.verify(pk2, MSG, fast.sign(expanded, MSG))  # the old key through the default signer


def test_ml_dsa_falls_back_to_pqcrypto_without_openssl():
    """Where cryptography's OpenSSL has no ML-DSA, ``ml-dsa-NN`` generates, signs and verifies with
    pqcrypto; a seed key then cannot sign (one-line error), and a wrong-length key neither."""
    from expertkit.errors import ConfigError
    from expertkit.federated.signing.mldsa import MlDsaSigner

    ref = get_signer("ml-dsa-65-pqcrypto")
    slow = MlDsaSigner("65", ref, None)
    assert slow.backend == "pqcrypto" and slow.secret_key_size == ref.secret_key_size
    pk, sk = slow.keygen()
    assert len(sk) == ref.secret_key_size and get_signer("ml-dsa-65").verify(pk, MSG, slow.sign(sk, MSG))
    fast_pk, seed = get_signer("ml-dsa-65").keygen()
    assert slow.verify(fast_pk, MSG, get_signer("ml-dsa-65").sign(seed, MSG))
    with pytest.raises(ConfigError, match="32-byte FIPS 204 seed, which needs the cryptography package"):
        slow.sign(seed, MSG)
    with pytest.raises(ConfigError, match="a secret key of 31 bytes"):
        get_signer("ml-dsa-65").sign(seed[:31], MSG)


@pytest.mark.parametrize("name", [f"slh-dsa-{h}-{p}" for h in ("sha2", "shake") for p in SLH_SIZES])
def test_slh_dsa_signatures_verify_under_an_independent_fips205_verifier(name):
    """pqcrypto's signatures verify under tests/federated/slh_verify_reference.py (FIPS 205 pure mode,
    empty context: the internal message is 0x00 || 0x00 || M); a flipped bit anywhere is rejected by both."""
    from slh_verify_reference import verify as ref_verify

    s = get_signer(name)
    variant = name.removeprefix("slh-dsa-")
    pk, sk = s.keygen()
    sig = s.sign(sk, MSG)
    assert ref_verify(variant, pk, b"\x00\x00" + MSG, sig)
    assert not ref_verify(variant, pk, MSG, sig)  # without the pure-mode prefix the digest differs
    n = len(pk) // 2
    cases = {"message": (pk, MSG[:-1] + b"!", sig), "R": (pk, MSG, _flip(sig, 0)),
             "FORS": (pk, MSG, _flip(sig, n + 3)), "hypertree": (pk, MSG, _flip(sig, len(sig) - n // 2)),
             "PK.seed": (_flip(pk, 1), MSG, sig), "PK.root": (_flip(pk, n + 1), MSG, sig)}
    for part, (p, m, g) in cases.items():
        assert not s.verify(p, m, g) and not ref_verify(variant, p, b"\x00\x00" + m, g), part


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x10
    return bytes(out)
