"""FN-DSA cross-implementation and known-answer checks.

* ``expertkit.federated.signing.fndsa_ref`` (pure Python + numpy, written from the scheme's
  description) verifies what ``py-fn-dsa`` signs, rejects tampering, and agrees with
  ``py-fn-dsa``'s verifier on every valid and tampered case below.
* ``py-fn-dsa`` reproduces the upstream c-fn-dsa known-answer vectors (seed -> key pair and
  signature, hashed with SHA3-256), and those KAT signatures verify under the reference verifier.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import py_fn_dsa
import pytest

from expertkit.federated.signing import fndsa_ref as ref
from expertkit.federated.signing import get_signer

MESSAGES = [b"", b"m", b"expertkit federated update" * 3, bytes(range(256)) * 40]


@pytest.fixture(scope="module", params=[9, 10], ids=["fn-dsa-512", "fn-dsa-1024"])
def keyed(request):
    """(logn, signer, public key, secret key): one py-fn-dsa key pair per degree."""
    logn = request.param
    signer = get_signer(f"fn-dsa-{1 << logn}")
    pk, sk = signer.keygen()
    return logn, signer, pk, sk


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def test_py_fn_dsa_signatures_verify_under_the_reference(keyed):
    logn, signer, pk, sk = keyed
    for msg in MESSAGES:
        sig = signer.sign(sk, msg)
        assert len(sig) == ref.SIG_SIZE[logn] and sig[0] == 0x30 + logn
        assert ref.verify(pk, msg, sig), f"reference rejected a py-fn-dsa signature of a {len(msg)}-byte message"


def test_a_flipped_bit_is_rejected_by_both_and_they_agree_everywhere(keyed):
    logn, signer, pk, sk = keyed
    msg = MESSAGES[2]
    sig = signer.sign(sk, msg)
    other_pk, _ = signer.keygen()
    end_of_s2 = len(sig.rstrip(b"\x00"))  # zero padding after the compressed s2
    tampered = {
        "message": (pk, _flip(msg, 5), sig),
        "message+1": (pk, msg + b"\x00", sig),
        "sig header": (pk, msg, _flip(sig, 0, 1)),
        "sig nonce": (pk, msg, _flip(sig, 7, 3)),
        "sig s2 start": (pk, msg, _flip(sig, 41, 0)),  # sign bit of s2[0]
        "sig s2 middle": (pk, msg, _flip(sig, (41 + end_of_s2) // 2, 4)),
        "sig s2 last byte": (pk, msg, _flip(sig, end_of_s2 - 1, 7)),
        "sig padding": (pk, msg, _flip(sig, len(sig) - 1, 0)) if end_of_s2 < len(sig) else None,
        "sig truncated": (pk, msg, sig[:-1]),
        "key header": (_flip(pk, 0, 0), msg, sig),
        "key value": (_flip(pk, 100, 2), msg, sig),
        "key high bits": (_flip(pk, len(pk) - 1, 7), msg, sig),
        "other key": (other_pk, msg, sig),
    }
    valid = {f"valid {i}": (pk, m, signer.sign(sk, m)) for i, m in enumerate(MESSAGES[:3])}
    for name, case in {**valid, **tampered}.items():
        if case is None:
            continue
        theirs = signer.verify(*case)
        ours = ref.verify(*case)
        assert ours == theirs, f"{name}: reference {ours}, py-fn-dsa {theirs}"
        assert ours is name.startswith("valid"), name


def test_both_verifiers_agree_on_random_single_bit_flips(keyed):
    """60 seeded random single-bit flips over key, message and signature: both verifiers reject each."""
    _, signer, pk, sk = keyed
    msg = MESSAGES[2]
    sig = signer.sign(sk, msg)
    rng = np.random.default_rng(7)
    for _ in range(60):
        case = [pk, msg, sig]
        part = int(rng.integers(3))
        pos = int(rng.integers(len(case[part])))
        case[part] = _flip(case[part], pos, int(rng.integers(8)))
        assert (ref.verify(*case), signer.verify(*case)) == (False, False), (part, pos)


def test_reference_arithmetic_is_consistent(keyed):
    """The key's NTT values interpolate to h with f*h = g mod q (f, g from the secret key), and the
    schoolbook negacyclic product agrees with the pointwise product of evaluations."""
    logn, _, pk, sk = keyed
    n = 1 << logn
    _, h_ntt = ref.decode_public_key(pk)
    h = ref.ntt_to_coeffs(logn, h_ntt)
    assert np.array_equal(ref.coeffs_to_ntt(logn, h), h_ntt)
    nbits = {9: 6, 10: 5}[logn]  # c-fn-dsa's bit width of f and g in the signing key
    f, g = (_signed_bits(sk[1 + k * nbits * n // 8: 1 + (k + 1) * nbits * n // 8], nbits, n) for k in (0, 1))
    assert np.array_equal(ref.negacyclic_mul(f, h) % ref.Q, g % ref.Q)
    rng = np.random.default_rng(logn)
    a, b = rng.integers(-900, 900, n), rng.integers(0, ref.Q, n)
    pointwise = ref.coeffs_to_ntt(logn, a) * ref.coeffs_to_ntt(logn, b) % ref.Q
    assert np.array_equal(ref.coeffs_to_ntt(logn, ref.negacyclic_mul(a, b)), pointwise)


def _signed_bits(data: bytes, nbits: int, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little").reshape(n, nbits).astype(np.int64)
    v = bits @ (1 << np.arange(nbits, dtype=np.int64))
    return np.where(v >= 1 << (nbits - 1), v - (1 << nbits), v)


def _comp(values, *, minus_zero_at=None, size=ref.SIG_SIZE[9] - 41) -> bytes:
    """Compress values the way the decoder reads them (LSB-first: sign, 7 low bits, unary high part)."""
    bits: list[int] = []
    for i, v in enumerate(values):
        m = abs(v)
        bits += [int(v < 0 or i == minus_zero_at)] + [(m >> k) & 1 for k in range(7)] + [0] * (m >> 7) + [1]
    packed = np.packbits(np.array(bits, dtype=np.uint8), bitorder="little").tobytes()
    return packed + bytes(size - len(packed))


def test_s2_decoder_reads_canonical_and_rejects_non_canonical_encodings():
    values = ([0, 1, -1, 127, -128, 840, -840, 300] + [3] * 24) * 16
    assert ref.decode_s2(9, _comp(values)).tolist() == values
    assert ref.decode_s2(9, bytes(ref.SIG_SIZE[9] - 41)) is None  # no unary terminator anywhere
    assert ref.decode_s2(9, _comp([0] * 512, minus_zero_at=3)) is None  # "-0"
    assert ref.decode_s2(9, _comp([0] * 511 + [841])) is None  # beyond the infinity-norm bound 840
    trailing = bytearray(_comp([0] * 512))
    trailing[-1] = 1
    assert ref.decode_s2(9, bytes(trailing)) is None  # a non-zero bit after the last value
    assert ref.decode_s2(9, _comp([5] * 512)[:100]) is None  # runs off the end


@pytest.mark.parametrize("logn", [9, 10])
def test_acceptance_bounds(logn):
    n, bound = 1 << logn, ref.SQ_BETA[logn]
    zero = np.zeros(n, dtype=np.int64)
    spike = zero.copy()
    spike[3] = 840
    assert ref.acceptable(logn, spike, zero) and ref.acceptable(logn, zero, -spike)
    spike[3] = 841  # squared norm far below the bound, but one coefficient beyond 840
    assert not ref.acceptable(logn, spike, zero) and not ref.acceptable(logn, zero, spike)
    v = math.isqrt(bound // n)  # a flat s1 just under the bound, topped up by one s2 coefficient
    flat = np.full(n, v, dtype=np.int64)
    s2 = zero.copy()
    s2[0] = math.isqrt(bound - n * v * v)
    assert int(s2[0]) <= 840 and n * v * v + int(s2[0]) ** 2 <= bound
    assert ref.acceptable(logn, flat, s2)
    s2[0] += 1
    assert not ref.acceptable(logn, flat, s2)


# Upstream c-fn-dsa test_fndsa.c (test_kat): entry j uses seed = SHAKE256(logn || j as 4 LE bytes),
# 32 bytes for key generation then 40 for signing; message "message" (raw for even j, SHA3-256
# pre-hashed for odd j), context "domain"; the value is SHA3-256(signing key || verifying key || sig).
KAT = {
    9: ["71009cd3bc68f5061608ab541e9ae27ba0263c42fad97c112825075176d539d0",
        "70d8e2492da097f5407459eb9e3d58697855984e305032973a49709d208ddf1d",
        "91807eec4fc11be204e0bb48d6cc5968dd4dd4e1e886370ddb0c95458d9b68f0",
        "ded7d5c6392f0e16926a8e535b3bdb8b0fb4dc6dfd108ce8229c8ce6a378e965",
        "7c6a265c4b6732dccbb2fcc872be4546709285f8ed13902d7adfef2fb006d513",
        "c4afc6d00b2560fe567a1fab088d8b5e35774d4154a638fc5e4a10cc587aa798",
        "e3a0d6f8aba1c5658e053234fa0526f0d6c05f33fece73965871376a1f9039fc",
        "56d822207747b7c8bd47914482d63609e303bfa380b795b9f0f74cc0728ed040",
        "4021a79b26e2b5ad8603b1ec203a0de7177bbb2c4f7e046be5438842dcef30ad",
        "2ecca13d10dc658e0915bc42a8687d2aa7605c8670a2ca5c67e480487eaa0281"],
    10: ["51bec3b8ca2565a94b2f1ad7bdc5f3844170495f235b8ea87fdae7e6d3b9dcb6",
         "abed632dec978f230f17e1c9059e36a7f0edfbaac2969ee75100421ea3346446",
         "83868908f2f89ee85a4e869b3d040de1f040e0dfa2e8cdabff00f0a2a2e8c120",
         "66f11c38b7f787bd66cd00ec62f3f2af622b81274a4dbe9462025b8d757710e1",
         "65602b1692abe97e845e41589d21927732f71c36ef1c888d155a15708b7b60e4",
         "95539caec65ac9a9ce23175168af914b905165b8f72c4d700f61b0b746683b11",
         "3a9632ee72a09704519eadea4b3688289c644f17105d29997d3555d21a428c7b",
         "b32a4019b5e5f802d4b61c751b99c58ffdee5adbf8cb97dc59c480756aa0a4f7",
         "439a026581a9472bf11b9f62389a066291b9a4ca789877ee2a44c9c6b5ca9852",
         "37b7f34cd910edc8b53b5302af4e2ff60192a396fe6c44fe8140a0ce0be04888"],
}
SHA3_256_OID = py_fn_dsa.HASH_ID_SHA3_256


@pytest.mark.parametrize("logn", [9, 10])
def test_py_fn_dsa_reproduces_the_c_fn_dsa_known_answers(logn):
    ffi, lib = py_fn_dsa.ffi, py_fn_dsa.lib
    sk_len, vk_len, sig_len = (py_fn_dsa._calc_sign_key_size(logn), py_fn_dsa._calc_vrfy_key_size(logn),
                               py_fn_dsa._calc_signature_size(logn))
    for j, expected in enumerate(KAT[logn]):
        seeds = hashlib.shake_256(bytes([logn]) + j.to_bytes(4, "little")).digest(72)
        sk, vk = ffi.new(f"unsigned char[{sk_len}]"), ffi.new(f"unsigned char[{vk_len}]")
        lib.fndsa_keygen_seeded(logn, seeds[:32], 32, sk, vk)
        sk, vk = bytes(ffi.buffer(sk)), bytes(ffi.buffer(vk))
        msg, oid = b"message", None
        if j & 1:
            msg, oid = hashlib.sha3_256(msg).digest(), SHA3_256_OID
        sig = ffi.new(f"unsigned char[{sig_len}]")
        got = lib.fndsa_sign_seeded(sk, sk_len, b"domain", 6, ffi.new("char[]", (oid or b"") + b"\0"), msg, len(msg),
                                    seeds[32:], 40, sig, sig_len)
        sig = bytes(ffi.buffer(sig, got))
        assert hashlib.sha3_256(sk + vk + sig).hexdigest() == expected, f"KAT {1 << logn}/{j}"
        assert ref.verify(vk, msg, sig, context=b"domain", prehash_oid=oid)  # the independent verifier agrees
        assert not ref.verify(vk, msg, sig, context=b"domaim", prehash_oid=oid)
        assert not ref.verify(vk, msg, sig)  # the context is bound
