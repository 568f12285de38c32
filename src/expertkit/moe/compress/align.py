"""Permutation alignment of SwiGLU experts before merging (weight matching).

Two experts compute the same function when one's intermediate neurons are a permutation of the
other's: neuron ``j`` is row ``j`` of the gate and up projections together with column ``j`` of the
down projection, and ``down[:, p] (act(gate[p] x) * up[p] x) = down (act(gate x) * up x)`` for any
permutation ``p``. Averaging experts neuron by neuron is only meaningful after their neurons are
matched, so every member of a group is permuted onto its anchor first.

The matching maximises the summed inner product of matched neurons' weight vectors
``[gate[j], up[j], down[:, j]]`` (all three matrices at once: the gate and up rows move together
with the matching down column), a linear assignment problem solved exactly by
``scipy.optimize.linear_sum_assignment``. For a member that is a permuted copy of the anchor the
identity matching of equal vectors is the unique maximum (Cauchy-Schwarz) when the anchor's neuron
vectors are distinct, so the permutation is recovered exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

CHUNK = 64  # hidden features per float64 product in AnchorFeatures.match


def align_to(gate_a: torch.Tensor, up_a: torch.Tensor, down_a: torch.Tensor,
             gate_b: torch.Tensor, up_b: torch.Tensor, down_b: torch.Tensor) -> torch.Tensor:
    """``(I,)`` permutation ``p`` such that expert B's neuron ``p[i]`` is matched to A's neuron ``i``.

    Apply it as ``gate_b[p], up_b[p], down_b[:, p]``.
    """
    return AnchorFeatures(gate_a, up_a, down_a).match((gate_b, up_b, down_b))


class AnchorFeatures:
    """An anchor expert's neuron vectors, kept while its group's members are matched to it.

    The score matrix (inner products of neuron vectors ``[gate[j], up[j], down[:, j]]``) is
    accumulated in float64, in place, part by part from one member matrix at a time and
    :data:`CHUNK` hidden features at a time, so the float64 copies of the anchor's and the member's
    matrices are never whole: whole ``(I, 3H)`` float64 feature copies of both experts, then a
    float64 anchor beside a float64 member matrix, were the streaming pass's peak during M-SMoE's
    alignment (measured per phase, bench/moe_compress.py and docs/benchmarks.md).
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        self.parts = (gate, up, down.T)  # (I, H) each, as given (down.T is a view); float64 per chunk

    def match(self, member: Iterable[torch.Tensor]) -> torch.Tensor:
        """``(I,)`` permutation ``p``: the member's neuron ``p[i]`` is matched to the anchor's neuron ``i``.

        ``member`` yields the member's gate ``(I, H)``, up ``(I, H)`` and down ``(H, I)`` in that
        order (a generator reading them one at a time holds one matrix at a time).
        """
        from scipy.optimize import linear_sum_assignment

        n = self.parts[0].shape[0]
        score = torch.zeros(n, n, dtype=torch.float64)  # (I, I): anchor neuron i . member neuron j
        matrices = iter(member)
        for k, a in enumerate(self.parts):  # not zip: zip keeps its last items until it makes the next ones
            b = next(matrices)
            b = b.T if k == 2 else b  # (I, H)
            for h in range(0, b.shape[1], CHUNK):
                score.addmm_(a[:, h:h + CHUNK].double(), b[:, h:h + CHUNK].double().T)
            del b
        rows, cols = linear_sum_assignment(score.neg_().numpy())  # maximise the summed inner products
        perm = np.empty(len(rows), dtype=np.int64)
        perm[rows] = cols
        return torch.from_numpy(perm)
