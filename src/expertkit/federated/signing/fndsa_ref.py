"""An independent FN-DSA verifier in pure Python + numpy, for cross-checking ``py-fn-dsa`` only.

It is slow (tens of milliseconds a signature), not constant-time, and never used to accept real
updates: :class:`~expertkit.federated.signing.fndsa.FnDsaSigner` verifies with the C library. Its
job is the issue's cross-implementation check: signatures made by ``py-fn-dsa`` must verify here,
tampered ones must not, and both verifiers must agree on every case in ``tests/federated``.

What is verified is the FN-DSA *as implemented by c-fn-dsa* (the C code ``py-fn-dsa`` 0.2.0
vendors), which follows its author's reading of the unpublished FIPS 206 draft. It differs from the
Falcon round-3 specification in ways that matter for a verifier (all checked against the library):

* every encoding is little-endian: the 14-bit packing of the public key, the bit order of the
  compressed signature, and the 16-bit samples of hash-to-point;
* the public key holds the NTT of ``h`` (values ``h(zeta**(2*brv(i)+1))`` in bit-reversed order,
  ``zeta = 7**(1024/n)`` a primitive ``2n``-th root of unity mod q), not its coefficients;
* the message is first reduced to a 64-byte ``mu`` as in ML-DSA, binding a SHAKE256 hash of the
  public key and the context; ``c = HashToPoint(SHAKE256(nonce || mu))``;
* both halves of the signature have an infinity-norm bound of 840 (the encoding of ``s2`` and the
  check on ``s1``), besides the squared-norm bound ``floor(beta**2)``;
* signatures have a fixed length (666 / 1280 bytes), zero-padded.

Verification: decode ``h`` (NTT form -> coefficients by interpolation), decode ``s2``, compute
``c``, ``s1 = c - s2*h mod (x^n + 1, q)`` by schoolbook negacyclic convolution, centre, and accept
iff ``max|s1| <= 840`` and ``||s1||^2 + ||s2||^2 <= floor(beta^2)``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

Q = 12289
B_INF = 840  # infinity-norm bound on s1 and s2
SQ_BETA = {9: 34034726, 10: 70265242}  # floor(beta^2) for n = 512 and n = 1024
NONCE = 40
PK_SIZE = {9: 897, 10: 1793}
SIG_SIZE = {9: 666, 10: 1280}


def _brv(i: int, bits: int) -> int:
    return int(format(i, f"0{bits}b")[::-1], 2)


@lru_cache(maxsize=2)
def _eval_matrix(logn: int) -> np.ndarray:
    """``E[i, j] = w_i**j mod q`` with ``w_i = zeta**(2*brv(i)+1)``: the key's NTT is ``E @ h``."""
    n = 1 << logn
    zeta = pow(7, 1024 // n, Q)
    if pow(zeta, n, Q) != Q - 1:  # a primitive 2n-th root of unity: zeta^n = -1
        raise AssertionError("7 is not a primitive 2048-th root of unity mod q")
    w = np.array([pow(zeta, 2 * _brv(i, logn) + 1, Q) for i in range(n)], dtype=np.int64)
    e = np.ones((n, n), dtype=np.int64)
    for j in range(1, n):
        e[:, j] = e[:, j - 1] * w % Q
    return e


def _mat_vec(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    # each product < q^2 and n <= 1024 terms: < 2^38, safe in int64
    return (m @ (v % Q)) % Q


def ntt_to_coeffs(logn: int, values: np.ndarray) -> np.ndarray:
    """Coefficients of the polynomial whose evaluations (bit-reversed order) are ``values``.

    The evaluation points ``w_i`` are the n roots of ``x^n + 1``, so interpolation is
    ``a_j = n^-1 * sum_i A_i * w_i^-j``, and ``w_i^-j = -w_i^(n-j)`` for ``0 < j < n`` (``w^n = -1``).
    """
    n = 1 << logn
    e = _eval_matrix(logn)
    inv_n = pow(n, Q - 2, Q)
    inv = np.empty_like(e)  # inv[i, j] = w_i^-j
    inv[:, 0] = 1
    inv[:, 1:] = (-e[:, :0:-1]) % Q
    return (inv.T @ (np.asarray(values, dtype=np.int64) % Q)) % Q * inv_n % Q


def coeffs_to_ntt(logn: int, coeffs: np.ndarray) -> np.ndarray:
    """The evaluations of ``coeffs`` at the NTT points, in the key's (bit-reversed) order."""
    return _mat_vec(_eval_matrix(logn), np.asarray(coeffs, dtype=np.int64))


def decode_public_key(pk: bytes) -> tuple[int, np.ndarray] | None:
    """``(logn, values)``: header byte ``logn`` then n 14-bit little-endian values, each < q."""
    if not pk or pk[0] not in PK_SIZE or len(pk) != PK_SIZE[pk[0]]:
        return None
    logn, n = pk[0], 1 << pk[0]
    bits = np.unpackbits(np.frombuffer(pk[1:], dtype=np.uint8), bitorder="little").reshape(n, 14)
    values = bits.astype(np.int64) @ (1 << np.arange(14, dtype=np.int64))
    return (logn, values) if bool((values < Q).all()) else None


def decode_s2(logn: int, data: bytes) -> np.ndarray | None:
    """The compressed ``s2`` (LSB-first bit stream): per coefficient a sign bit, the low 7 bits
    of |x|, then |x| >> 7 in unary (that many 0 bits, then a 1). ``-0``, |x| > 840, running off
    the end, or any non-zero bit after the last coefficient make the encoding invalid."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little").tolist()
    n, pos, out = 1 << logn, 0, []
    for _ in range(n):
        if pos + 8 > len(bits):
            return None
        sign = bits[pos]
        low = sum(bits[pos + 1 + k] << k for k in range(7))
        pos += 8
        high = 0
        while pos < len(bits) and bits[pos] == 0:
            high += 1
            pos += 1
        if pos >= len(bits):
            return None
        pos += 1  # the terminating 1
        m = low + (high << 7)
        if m > B_INF or (m == 0 and sign):
            return None
        out.append(-m if sign else m)
    if any(bits[pos:]):
        return None
    return np.array(out, dtype=np.int64)


def message_representative(pk: bytes, message: bytes, context: bytes = b"", prehash_oid: bytes | None = None) -> bytes:
    """``mu = SHAKE256(SHAKE256(pk, 64) || mode || len(ctx) || ctx || [oid] || message, 64)``;
    ``mode`` is 0 for a raw message and 1 for a pre-hashed one (``prehash_oid`` is the DER OID)."""
    if len(context) > 255:
        raise ValueError("context is at most 255 bytes")
    head = hashlib.shake_256(pk).digest(64)
    mode = b"\x00" if prehash_oid is None else b"\x01"
    return hashlib.shake_256(head + mode + bytes([len(context)]) + context + (prehash_oid or b"") + message).digest(64)


def hash_to_point(logn: int, nonce: bytes, mu: bytes) -> np.ndarray:
    """c: 16-bit little-endian samples of SHAKE256(nonce || mu); keep those < 5q, reduce mod q."""
    n, want = 1 << logn, 4 << logn
    while True:
        raw = np.frombuffer(hashlib.shake_256(nonce + mu).digest(want), dtype="<u2").astype(np.int64)
        kept = raw[raw < 5 * Q]
        if len(kept) >= n:
            return kept[:n] % Q
        want *= 2


def negacyclic_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a * b mod (x^n + 1)`` (integer coefficients; the caller reduces mod q)."""
    n = len(a)
    full = np.convolve(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    out = full[:n].copy()
    out[: n - 1] -= full[n:]
    return out


def _centred(v: np.ndarray) -> np.ndarray:
    v = v % Q
    return np.where(v > Q // 2, v - Q, v)


def verify(pk: bytes, message: bytes, signature: bytes, *, context: bytes = b"",
           prehash_oid: bytes | None = None) -> bool:
    """Whether ``signature`` is a valid FN-DSA-512/1024 signature of ``message`` under ``pk``."""
    key = decode_public_key(bytes(pk))
    if key is None or len(context) > 255:
        return False
    logn, h_ntt = key
    sig = bytes(signature)
    if len(sig) != SIG_SIZE[logn] or sig[0] != 0x30 + logn:
        return False
    s2 = decode_s2(logn, sig[1 + NONCE:])
    if s2 is None:
        return False
    h = ntt_to_coeffs(logn, h_ntt)
    c = hash_to_point(logn, sig[1:1 + NONCE], message_representative(bytes(pk), bytes(message), context, prehash_oid))
    return acceptable(logn, _centred(c - negacyclic_mul(s2, h)), s2)


def acceptable(logn: int, s1: np.ndarray, s2: np.ndarray) -> bool:
    """The final test: ``max|s1|, max|s2| <= 840`` and ``||s1||^2 + ||s2||^2 <= floor(beta^2)``."""
    if max(int(np.abs(s1).max()), int(np.abs(s2).max())) > B_INF:
        return False
    return int((s1 * s1).sum() + (s2 * s2).sum()) <= SQ_BETA[logn]
