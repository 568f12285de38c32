"""An independent SLH-DSA (FIPS 205) signature verifier, written from the standard, hashlib only.

``verify(variant, pk, message, sig)`` is slh_verify_internal (FIPS 205 algorithm 20): H_msg
(section 11), FORS public key from the signature (algorithms 4 and 17), then the hypertree
(algorithms 5, 8, 11 and 13) up to PK.root. It reuses the address and tweakable-hash code of
slh_reference.py. The caller passes the message exactly as the internal function sees it (for
pure SLH-DSA with an empty context that is ``0x00 || 0x00 || M``, FIPS 205 algorithm 22).
"""

from __future__ import annotations

import hashlib
import math

from slh_reference import TREE, WOTS_HASH, WOTS_PK, Adrs, Hashes

FORS_TREE, FORS_ROOTS = 3, 4
# FIPS 205 table 2: n, h, d, h' (= h/d), a, k, m; lg_w = 4 for every set
PARAMS = {
    "128s": (16, 63, 7, 9, 12, 14, 30), "128f": (16, 66, 22, 3, 6, 33, 34),
    "192s": (24, 63, 7, 9, 14, 17, 39), "192f": (24, 66, 22, 3, 8, 33, 42),
    "256s": (32, 64, 8, 8, 14, 22, 47), "256f": (32, 68, 17, 4, 9, 35, 49),
}
W, LG_W = 16, 4


def base_2b(x: bytes, b: int, out_len: int) -> list[int]:
    """Algorithm 4: ``out_len`` big-endian ``b``-bit integers from ``x``."""
    total, bits, pos, out = 0, 0, 0, []
    for _ in range(out_len):
        while bits < b:
            total = (total << 8) | x[pos]
            pos, bits = pos + 1, bits + 8
        bits -= b
        out.append((total >> bits) & ((1 << b) - 1))
    return out


def _mgf1(hash_fn, seed: bytes, length: int) -> bytes:
    out, counter = b"", 0
    while len(out) < length:
        out += hash_fn(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length]


def h_msg(family: str, n: int, m: int, r: bytes, pk_seed: bytes, pk_root: bytes, msg: bytes) -> bytes:
    """H_msg of the SHAKE (11.1) or SHA2 (11.2.1 / 11.2.2) instantiation."""
    if family == "shake":
        return hashlib.shake_256(r + pk_seed + pk_root + msg).digest(m)
    hash_fn = hashlib.sha256 if n == 16 else hashlib.sha512
    return _mgf1(hash_fn, r + pk_seed + hash_fn(r + pk_seed + pk_root + msg).digest(), m)


def _climb(hs: Hashes, pk_seed: bytes, adrs: Adrs, node: bytes, leaf: int, auth: list[bytes]) -> bytes:
    """Hash a leaf up its authentication path (the loops of algorithms 11 and 17)."""
    for j, sibling in enumerate(auth):
        adrs.words[1] = j + 1  # tree height
        if (leaf >> j) & 1 == 0:
            adrs.words[2] //= 2
            node = hs.h(pk_seed, adrs, node + sibling)
        else:
            adrs.words[2] = (adrs.words[2] - 1) // 2
            node = hs.h(pk_seed, adrs, sibling + node)
    return node


def verify(variant: str, pk: bytes, message: bytes, sig: bytes) -> bool:
    """Whether ``sig`` is a valid slh-dsa-``variant`` signature (e.g. ``sha2-128s``) of ``message``."""
    family, size = variant.split("-")
    n, h, d, hp, a, k, m = PARAMS[size]
    len1 = 2 * n
    length = len1 + math.floor(math.log2(len1 * (W - 1)) / LG_W) + 1
    if len(pk) != 2 * n or len(sig) != (1 + k * (1 + a) + h + d * length) * n:
        return False
    hs = Hashes(family, n)
    pk_seed, pk_root = pk[:n], pk[n:]
    chunks = [sig[i:i + n] for i in range(0, len(sig), n)]
    r, fors, ht = chunks[0], chunks[1:1 + k * (1 + a)], chunks[1 + k * (1 + a):]

    digest = h_msg(family, n, m, r, pk_seed, pk_root, message)
    md_len, tree_len, leaf_len = (k * a + 7) // 8, (h - hp + 7) // 8, (hp + 7) // 8
    md = digest[:md_len]
    idx_tree = int.from_bytes(digest[md_len:md_len + tree_len], "big") % (1 << (h - hp))
    idx_leaf = int.from_bytes(digest[md_len + tree_len:md_len + tree_len + leaf_len], "big") % (1 << hp)

    # FORS (algorithm 17)
    adrs = Adrs()
    adrs.tree = idx_tree
    adrs.set_type_and_clear(FORS_TREE)
    adrs.words[0] = idx_leaf
    roots = []
    for i, index in enumerate(base_2b(md, a, k)):
        part = fors[i * (a + 1):(i + 1) * (a + 1)]
        adrs.words[1], adrs.words[2] = 0, (i << a) + index
        roots.append(_climb(hs, pk_seed, adrs, hs.f(pk_seed, adrs, part[0]), index, part[1:]))
    roots_adrs = adrs.copy()
    roots_adrs.set_type_and_clear(FORS_ROOTS)
    roots_adrs.words[0] = idx_leaf
    node = hs.h(pk_seed, roots_adrs, b"".join(roots))

    # hypertree (algorithm 13), one XMSS layer at a time (algorithms 11 and 8)
    for layer in range(d):
        if layer:
            idx_leaf, idx_tree = idx_tree % (1 << hp), idx_tree >> hp
        xmss = ht[layer * (length + hp):(layer + 1) * (length + hp)]
        adrs = Adrs()
        adrs.layer, adrs.tree = layer, idx_tree
        adrs.set_type_and_clear(WOTS_HASH)
        adrs.words[0] = idx_leaf
        node = hs.h(pk_seed, _wots_pk_adrs(adrs), _wots_tops(hs, pk_seed, adrs, node, xmss[:length], len1, length))
        adrs.set_type_and_clear(TREE)
        adrs.words[2] = idx_leaf
        node = _climb(hs, pk_seed, adrs, node, idx_leaf, xmss[length:])
    return node == pk_root


def _wots_pk_adrs(adrs: Adrs) -> Adrs:
    out = adrs.copy()
    out.set_type_and_clear(WOTS_PK)
    out.words[0] = adrs.words[0]
    return out


def _wots_tops(hs: Hashes, pk_seed: bytes, adrs: Adrs, msg: bytes, sig: list[bytes], len1: int, length: int) -> bytes:
    """The chain ends of WOTS+ ``pkFromSig`` (algorithm 8), concatenated for T_len."""
    digits = base_2b(msg, LG_W, len1)
    csum = sum(W - 1 - v for v in digits)
    len2 = length - len1
    csum <<= (8 - (len2 * LG_W) % 8) % 8
    digits += base_2b(csum.to_bytes((len2 * LG_W + 7) // 8, "big"), LG_W, len2)
    tops = []
    for i, (v, x) in enumerate(zip(digits, sig, strict=True)):
        adrs.words[1] = i  # chain address
        for j in range(v, W - 1):
            adrs.words[2] = j  # hash address
            x = hs.f(pk_seed, adrs, x)
        tops.append(x)
    return b"".join(tops)
