"""``expertkit fl measure``: the paper's measurement of signature schemes in federated learning.

Per scheme: key generation, signing and verification time (median of ``repeats``), public key and
signature sizes. Per update size (1 MB up to the full bundled model): the time to hash the update
canonically. The per-round overhead of a scheme for an update of size S is what signing adds to a
round: the client hashes and signs, the server hashes and verifies,
``2 * hash(S) + sign + verify``; divided by a measured round time it is the fraction a round gets
slower. Signing cost does not depend on S (the signature covers a 32-byte digest), hashing does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from expertkit.federated.digest import UpdateHasher, binding_message
from expertkit.federated.signing import get_signer, scheme_names

#: ml-dsa-NN is OpenSSL's implementation where available; ml-dsa-65-pqcrypto is the reference code beside it
PAPER_SCHEMES = ("ml-dsa-44", "ml-dsa-65", "ml-dsa-87", "ml-dsa-65-pqcrypto", "fn-dsa-512", "fn-dsa-1024",
                 "slh-dsa-sha2-128s", "slh-dsa-sha2-128f", "slh-dsa-shake-128f", "slh-dsa-sha2-256f", "ed25519",
                 "ed25519+ml-dsa-65")


def _median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_scheme(name: str, repeats: int = 5) -> dict[str, Any]:
    """Keygen / sign / verify medians (ms) and sizes (bytes) of one scheme over a binding message."""
    s = get_signer(name)
    msg = binding_message(bytes(32), alg="sha3-256", run_id="bench", server_round=1, sender="client-0",
                          role="client-update")
    keys = [s.keygen() for _ in range(max(1, repeats))]
    pk, sk = keys[0]
    sig = s.sign(sk, msg)
    if not s.verify(pk, msg, sig):  # pragma: no cover - a broken library
        raise RuntimeError(f"{name}: a fresh signature does not verify")
    return {
        "scheme": name, "family": s.family, "post_quantum": s.post_quantum,
        "public_key_bytes": len(pk), "signature_bytes": len(sig),
        "keygen_ms": 1000 * _median_seconds(s.keygen, repeats),
        "sign_ms": 1000 * _median_seconds(lambda: s.sign(sk, msg), repeats),
        "verify_ms": 1000 * _median_seconds(lambda: s.verify(pk, msg, sig), repeats),
    }


def hash_seconds(size_bytes: int, alg: str = "sha3-256", tensor_bytes: int = 4 << 20, repeats: int = 3) -> float:
    """Median time to hash an update of ``size_bytes`` made of float32 tensors of ``tensor_bytes`` each."""
    n_full, rest = divmod(size_bytes, tensor_bytes)
    block = np.random.default_rng(0).standard_normal(tensor_bytes // 4).astype(np.float32)
    parts = [block] * n_full + ([block[: rest // 4]] if rest // 4 else [])

    def run() -> None:
        h = UpdateHasher(alg)
        for i, p in enumerate(parts):
            h.tensor(f"t{i}", "float32", p.shape, memoryview(p).cast("B"))
        h.digest()

    return _median_seconds(run, repeats)


def measure(schemes: Sequence[str] | None = None, sizes_mb: Sequence[float] = (1, 10, 100), *,
            full_model_bytes: int | None = None, round_seconds: float | None = None, repeats: int = 5,
            alg: str = "sha3-256") -> dict[str, Any]:
    """The per-scheme table, the hashing table and (with ``round_seconds``) per-round overhead fractions."""
    names = list(schemes) if schemes else [n for n in PAPER_SCHEMES if n in scheme_names()]
    rows = [measure_scheme(n, repeats) for n in names]
    sizes = [int(mb * 2**20) for mb in sizes_mb] + ([full_model_bytes] if full_model_bytes else [])
    hashing = {str(b): hash_seconds(b, alg) for b in sizes}
    return {"alg": alg, "repeats": repeats, "schemes": rows, "hash_seconds": hashing,
            "overhead": overhead(rows, hashing, round_seconds), "round_seconds": round_seconds}


def overhead(rows: Sequence[dict[str, Any]], hashing: dict[str, float], round_seconds: float | None) -> list[dict[str, Any]]:
    """Per scheme and update size: ``2 * hash(S) + (sign_ms + verify_ms) / 1000`` seconds, and that
    divided by ``round_seconds`` (``None`` without a round time). ``hashing`` maps str(bytes) to seconds."""
    out = []
    for r in rows:
        for size, hash_s in hashing.items():
            secs = 2 * hash_s + (r["sign_ms"] + r["verify_ms"]) / 1000
            out.append({"scheme": r["scheme"], "update_bytes": int(size), "added_seconds": secs,
                        "fraction_of_round": secs / round_seconds if round_seconds else None})
    return out


def markdown(result: dict[str, Any]) -> str:
    """The scheme table and the overhead table as markdown."""
    lines = ["| scheme | PQ | public key (B) | signature (B) | keygen (ms) | sign (ms) | verify (ms) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["schemes"]:
        lines.append(f"| {r['scheme']} | {'yes' if r['post_quantum'] else 'no'} | {r['public_key_bytes']} | "
                     f"{r['signature_bytes']} | {r['keygen_ms']:.3f} | {r['sign_ms']:.3f} | {r['verify_ms']:.3f} |")
    sizes = list(result["hash_seconds"])
    lines += ["", "Added time per client per round, ms (2 x hash + sign + verify)"
              + (f"; in brackets, % of a {result['round_seconds']:.1f} s round" if result["round_seconds"] else "") + ":",
              "", "| scheme | " + " | ".join(f"{int(b) / 2**20:.0f} MB" for b in sizes) + " |",
              "|---|" + "---:|" * len(sizes)]
    for r in result["schemes"]:
        cells = []
        for o in (o for o in result["overhead"] if o["scheme"] == r["scheme"]):
            frac = f" ({100 * o['fraction_of_round']:.3f}%)" if o["fraction_of_round"] is not None else ""
            cells.append(f"{1000 * o['added_seconds']:.1f}{frac}")
        lines.append(f"| {r['scheme']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
