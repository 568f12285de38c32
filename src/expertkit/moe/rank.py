"""How low-rank are the differences between experts? (If they were, merging them would be trivial.)

For a matrix with singular values ``s``: the *effective rank* of Roy & Vetterli (2007),
``exp(H(p))`` with ``p = s / sum(s)``, and the *energy rank*, the fewest singular values holding
90% of ``sum(s^2)``. Both equal the rank for a matrix with equal non-zero singular values and 1
for a rank-one matrix. :func:`difference_ranks` computes them for every pair of experts (and each
expert against the base) on a sample of layers and reports them beside the full rank.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def effective_rank(matrix: torch.Tensor, energy: float = 0.9) -> tuple[float, int]:
    """``(entropy effective rank, rank holding `energy` of the squared Frobenius norm)`` of a 2-D matrix."""
    s = torch.linalg.svdvals(matrix.double())  # (min(m, n),) descending
    if float(s.sum()) == 0.0:
        return 0.0, 0
    p = s / s.sum()
    p = p[p > 0]
    entropy_rank = math.exp(float(-(p * p.log()).sum()))
    cum = (s**2).cumsum(0) / (s**2).sum()
    return entropy_rank, int((cum < energy).sum()) + 1


def difference_ranks(expert_files: Sequence[Path], base: Path, layers: Sequence[int] | None = None) -> dict[str, Any]:
    """Effective ranks of ``W_i - W_j`` over expert pairs, and of ``W_i - W_base``, on sampled layers.

    ``expert_files`` are safetensors files holding each expert's MLP tensors under the base's names.
    ``layers`` defaults to about five layers spread over the depth.
    """
    from expertkit.weights import Checkpoint

    handles = [Checkpoint(f) for f in expert_files]
    with Checkpoint(base) as base_ckpt:
        try:
            names = [n for n in handles[0].names() if n.endswith(".weight")]
            depth = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n})
            if layers is None:
                step = max(1, len(depth) // 5)
                layers = depth[::step]
            chosen = [n for n in names if ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) in layers]
            pairs, vs_base, full = [], [], 0
            for name in chosen:
                ws = [h.read(name).float() for h in handles]
                full = min(ws[0].shape)
                b = base_ckpt.read(name).float()
                for i, j in itertools.combinations(range(len(ws)), 2):
                    pairs.append(effective_rank(ws[i] - ws[j]))
                vs_base.extend(effective_rank(w - b) for w in ws)
        finally:
            for h in handles:
                h.close()

    def stats(values: list[tuple[float, int]]) -> dict[str, float]:
        ent = [v[0] for v in values]
        en = [v[1] for v in values]
        return {"entropy_rank_mean": sum(ent) / len(ent), "entropy_rank_min": min(ent),
                "energy90_rank_mean": sum(en) / len(en), "energy90_rank_min": min(en)}

    return {"layers": list(layers), "matrices": len(chosen), "full_rank": full,
            "pairwise": stats(pairs), "vs_base": stats(vs_base)}
