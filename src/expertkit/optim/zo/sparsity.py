"""Gradient sparsity: which coordinates a zeroth-order direction perturbs.

Exactly ``round((1 - sparsity) * n)`` coordinates of each tensor are perturbed (``layer``
scope), or one magnitude threshold is set over all tensors (``global``: exact when the
trainable tensors hold at most :data:`EXACT_GLOBAL` coordinates, else the threshold is the
quantile of a uniform sample of ``SAMPLE`` coordinates, within about 0.1% of the fraction).
``magnitude`` picks the smallest ``|θ|`` (Sparse MeZO's choice); ``random`` a uniform subset.

Unlike ZO-Bench's code, which zeroes entries of the projected gradient, the mask here is
applied to the direction itself: unselected coordinates are never perturbed nor updated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EXACT_GLOBAL = 1 << 24
SAMPLE = 1 << 21


def _layer_index(p: torch.Tensor, density: float, by: str, gen: torch.Generator) -> torch.Tensor:
    n = p.numel()
    k = round(density * n)
    if by == "random":
        idx = torch.randperm(n, generator=gen)[:k]
    else:
        idx = torch.topk(p.detach().abs().view(-1), k, largest=False, sorted=False).indices
    return idx.sort().values


def _global_threshold(params: Sequence[torch.Tensor], density: float, gen: torch.Generator) -> float:
    total = sum(p.numel() for p in params)
    k = max(1, round(density * total))
    if total <= EXACT_GLOBAL:
        allabs = torch.cat([p.detach().abs().view(-1).float() for p in params])
        return float(allabs.kthvalue(k).values)
    sample = []
    for p in params:
        m = max(1, round(SAMPLE * p.numel() / total))
        pos = torch.randint(0, p.numel(), (m,), generator=gen)
        sample.append(p.detach().view(-1)[pos].abs().float())
    allabs = torch.cat(sample)
    return float(allabs.kthvalue(max(1, round(density * allabs.numel()))).values)


def select_coordinates(
    params: Sequence[torch.Tensor], sparsity: float, *, scope: str = "layer", by: str = "magnitude", seed: int = 0,
) -> list[torch.Tensor | None]:
    """Flat indices (sorted, int64) of the coordinates to perturb in each tensor; None = all."""
    if sparsity == 0:
        return [None] * len(params)
    density = 1.0 - sparsity
    gen = torch.Generator().manual_seed(seed)
    if scope == "layer" or by == "random":
        return [_layer_index(p, density, by, gen) for p in params]
    tau = _global_threshold(params, density, gen)
    return [(p.detach().abs().view(-1) <= tau).nonzero().squeeze(1) for p in params]
