"""Clustering that places every model: agglomerative, average linkage, with a threshold.

:func:`agglomerative` starts from singletons and repeatedly joins the two closest clusters
(average linkage: the mean pairwise distance between their members) while that distance is at
most the threshold. Pairs marked incompatible (``allowed[i, j]`` false) are at infinite distance,
so incompatible models never share a cluster; every model ends in exactly one cluster (a model
close to nothing is a singleton, never dropped).

``threshold="auto"``: build the whole dendrogram of compatible joins, then cut in the largest
gap between successive join heights on a log scale (heights floored at ``1e-12``), provided the
gap is at least ``min_ratio`` (a factor of 10 by default); without such a gap every compatible
model joins one cluster. Model-GLUE clusters by cosine similarity of weights with a fixed
threshold; the gap rule picks the threshold for zoos whose families sit at very different
distances (LoRA experts of one base vs. experts of an evolved base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from expertkit.errors import ConfigError

FLOOR = 1e-12


@dataclass
class Clustering:
    """Clusters as lists of model indices, the threshold used and the join heights."""

    clusters: list[list[int]]
    threshold: float
    heights: list[float]  # every compatible join of the full dendrogram, in order


def _dendrogram(dist: torch.Tensor, allowed: torch.Tensor, stop: float) -> tuple[list[list[int]], list[float]]:
    clusters = [[i] for i in range(dist.shape[0])]
    heights: list[float] = []
    while len(clusters) > 1:
        best, pair = math.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                ia, ib = clusters[a], clusters[b]
                if not bool(allowed[ia][:, ib].all()):
                    continue
                d = float(dist[ia][:, ib].mean())
                if d < best:
                    best, pair = d, (a, b)
        if pair is None or best > stop:
            break
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
        heights.append(best)
    return clusters, heights


def auto_threshold(heights: list[float], min_ratio: float = 10.0) -> float:
    """The cut of the largest log-gap between successive join heights (``inf``: no gap)."""
    hs = sorted(max(h, FLOOR) for h in heights)
    best, cut = math.log(min_ratio), math.inf
    for lo, hi in zip(hs, hs[1:], strict=False):
        gap = math.log(hi / lo)
        if gap >= best:
            best, cut = gap, math.sqrt(lo * hi)  # geometric middle of the gap
    return cut


def agglomerative(
    distance: torch.Tensor,
    threshold: float | str = "auto",
    *,
    allowed: torch.Tensor | None = None,
    min_ratio: float = 10.0,
) -> Clustering:
    """Cluster ``n`` models from an ``(n, n)`` distance matrix (see the module docstring)."""
    n = distance.shape[0]
    if distance.shape != (n, n):
        raise ConfigError(f"distance must be square, got {list(distance.shape)}.")
    dist = distance.double()
    ok = torch.ones(n, n, dtype=torch.bool) if allowed is None else allowed.bool()
    _, heights = _dendrogram(dist, ok, math.inf)
    if threshold == "auto":
        cut = auto_threshold(heights, min_ratio)
    elif isinstance(threshold, (int, float)) and threshold >= 0:
        cut = float(threshold)
    else:
        raise ConfigError(f"threshold must be 'auto' or a number >= 0, got {threshold!r}.")
    clusters, _ = _dendrogram(dist, ok, cut)
    clusters.sort(key=lambda c: c[0])
    return Clustering(clusters, cut, heights)
