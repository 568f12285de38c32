"""An independent SLH-DSA (FIPS 205) key-generation reference, written from the standard.

``pk_root(variant, sk_seed, pk_seed)`` recomputes PK.root = the root of the top XMSS tree
(``xmss_node(SK.seed, 0, h', PK.seed, ADRS(layer d-1))``, FIPS 205 algorithms 5, 6, 9 and 21)
with hashlib only. A pqcrypto key pair is ``SK = SK.seed|SK.prf|PK.seed|PK.root``: recomputing
its PK.root from its seeds is a known-answer check of the library's key generation (WOTS+
chains, the XMSS tree and the tweakable hash functions of the SHA2 or SHAKE instantiation).
"""

from __future__ import annotations

import hashlib
import math

# variant: (n, h', d) (FIPS 205 table 2); lg_w = 4 everywhere
PARAMS = {"128f": (16, 3, 22), "192f": (24, 3, 22), "256f": (32, 4, 17),
          "128s": (16, 9, 7), "192s": (24, 9, 7), "256s": (32, 8, 8)}
WOTS_HASH, WOTS_PK, TREE, WOTS_PRF = 0, 1, 2, 5


class Adrs:
    """The 32-byte address: layer (4), tree (12), type (4), three 4-byte words."""

    def __init__(self) -> None:
        self.layer, self.tree, self.type, self.words = 0, 0, 0, [0, 0, 0]

    def copy(self) -> Adrs:
        a = Adrs()
        a.layer, a.tree, a.type, a.words = self.layer, self.tree, self.type, list(self.words)
        return a

    def set_type_and_clear(self, t: int) -> None:
        self.type, self.words = t, [0, 0, 0]

    def full(self) -> bytes:
        return (self.layer.to_bytes(4, "big") + self.tree.to_bytes(12, "big") + self.type.to_bytes(4, "big")
                + b"".join(w.to_bytes(4, "big") for w in self.words))

    def compressed(self) -> bytes:  # SHA2 instantiation: 22 bytes
        return (self.layer.to_bytes(1, "big") + self.tree.to_bytes(8, "big") + self.type.to_bytes(1, "big")
                + b"".join(w.to_bytes(4, "big") for w in self.words))


class Hashes:
    """PRF, F, H and T_l of the SHAKE or SHA2 instantiation (FIPS 205 sections 11.1 and 11.2)."""

    def __init__(self, family: str, n: int) -> None:
        self.family, self.n = family, n

    def _sha2(self, big: bool, pk_seed: bytes, adrs: Adrs, m: bytes) -> bytes:
        block = 128 if big else 64
        h = hashlib.sha512 if big else hashlib.sha256
        return h(pk_seed + bytes(block - self.n) + adrs.compressed() + m).digest()[: self.n]

    def f(self, pk_seed: bytes, adrs: Adrs, m: bytes) -> bytes:
        if self.family == "shake":
            return hashlib.shake_256(pk_seed + adrs.full() + m).digest(self.n)
        return self._sha2(False, pk_seed, adrs, m)

    prf = f  # PRF(PK.seed, SK.seed, ADRS) has F's form with SK.seed as the message

    def h(self, pk_seed: bytes, adrs: Adrs, m: bytes) -> bytes:  # H and T_l
        if self.family == "shake":
            return hashlib.shake_256(pk_seed + adrs.full() + m).digest(self.n)
        return self._sha2(self.n > 16, pk_seed, adrs, m)


def pk_root(variant: str, sk_seed: bytes, pk_seed: bytes) -> bytes:
    """PK.root of ``slh-dsa-{sha2,shake}-{128,192,256}{s,f}`` from the two seeds."""
    family, size = variant.split("-")
    n, hp, d = PARAMS[size]
    hs = Hashes(family, n)
    w = 16
    len1 = 8 * n // 4
    length = len1 + math.floor(math.log2(len1 * (w - 1)) / 4) + 1

    def wots_pk(adrs: Adrs) -> bytes:
        sk_adrs = adrs.copy()
        sk_adrs.set_type_and_clear(WOTS_PRF)
        sk_adrs.words[0] = adrs.words[0]
        tops = []
        for i in range(length):
            sk_adrs.words[1] = i
            x = hs.prf(pk_seed, sk_adrs, sk_seed)
            adrs.words[1] = i
            for j in range(w - 1):
                adrs.words[2] = j
                x = hs.f(pk_seed, adrs, x)
            tops.append(x)
        pk_adrs = adrs.copy()
        pk_adrs.set_type_and_clear(WOTS_PK)
        pk_adrs.words[0] = adrs.words[0]
        return hs.h(pk_seed, pk_adrs, b"".join(tops))

    def node(i: int, z: int, adrs: Adrs) -> bytes:
        if z == 0:
            adrs.set_type_and_clear(WOTS_HASH)
            adrs.words[0] = i
            return wots_pk(adrs)
        left, right = node(2 * i, z - 1, adrs), node(2 * i + 1, z - 1, adrs)
        adrs.set_type_and_clear(TREE)
        adrs.words[1], adrs.words[2] = z, i
        return hs.h(pk_seed, adrs, left + right)

    top = Adrs()
    top.layer = d - 1
    return node(0, hp, top)
