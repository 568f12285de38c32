"""TIES-merging: trim, elect sign, disjoint merge.

Semantics, per tensor (the paper's, with per-model weights as in mergekit):

1. *Trim*: each task vector ``d_i = theta_i - base`` keeps its ``k = max(1, int(density * numel))``
   largest magnitudes **within this tensor** (per-tensor top-k, not global over the model);
   the rest are set to 0. Elements tied with the k-th magnitude are all kept.
2. *Elect*: the sign of ``sum_i w_i d_i`` (the summed mass; +1 where the sum is exactly 0).
3. *Disjoint merge*: ``sum_i w_i d_i`` over the models whose ``w_i d_i`` has the elected sign,
   divided by the sum of those models' weights when ``normalize`` (default; a zero divisor
   counts as 1), times ``lambda``, added to the base.

With ``rescale`` (mergekit's option, off by default) each trimmed task vector is multiplied by
``|d_i|_1 / |trim(d_i)|_1`` before the election, so trimming keeps its L1 norm.

Differences from mergekit 0.1.5 ``ties``: mergekit picks exactly k elements with an argsort
(ties at the threshold broken by sort order) where expertkit keeps every tied element and uses
a k-th-value selection (faster, no sort). The defaults are mergekit's: ``density`` 1.0 (no
trimming; the paper's experiments use 0.2), ``normalize`` on, ``lambda`` 1.
"""

from __future__ import annotations

import torch
from pydantic import AliasChoices, Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, elect_and_mean, if_normalize, merge_method
from expertkit.merge.methods.blockwise import blockwise, delta_block, flat, kth_largest_magnitudes, trim, trimmed_merge


class TiesParams(MethodParams):
    """Parameters of ``ties``."""

    density: float = Field(1.0, ge=0.0, le=1.0, description="fraction of each task vector kept (per tensor, by magnitude)")
    lambda_: float = Field(1.0, validation_alias=AliasChoices("lambda", "scaling", "lambda_"),
                           serialization_alias="lambda", description="scale of the merged task vector")
    normalize: bool = Field(True, description="disjoint mean (divide by the agreeing models' weights)")
    rescale: bool = Field(False, description="scale each trimmed task vector back to its L1 norm before trimming")


@merge_method("ties", params=TiesParams, needs_base=True, per_model=("density",), normaliser=if_normalize("subsets"),
              vs_mergekit="equal (1e-6); elements tied with the k-th magnitude are all kept (mergekit: sort order)",
              paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
              summary="trim to top-k magnitude, elect sign by summed mass, disjoint mean", zero_copy=True)
def ties(x: TensorInputs) -> torch.Tensor:
    """Trim each task vector to its per-tensor top-k, elect signs, average the agreeing entries.

    Without ``rescale``: one block-wise pass over the inputs that finds the thresholds and merges
    at once, then a fix-up of the few elements near a threshold
    (:func:`~expertkit.merge.methods.blockwise.trimmed_merge`). With ``rescale`` (the factors need
    the thresholds' L1 sums first): :func:`ties_two_pass`. Both read the inputs only and write the
    result in the output dtype, with the same bits."""
    p, wd = x.params, x.work_dtype
    if p.rescale:
        return ties_two_pass(x)
    n = x.base.numel()
    ks = [None if pm.density >= 1 else 0 if pm.density <= 0 else max(1, int(pm.density * n)) for pm in x.per_model]
    out = torch.empty(x.base.shape, dtype=x.out_dtype or wd)
    return trimmed_merge(out, x.tensors, x.base, ks, wd,
                         lambda deltas, b: _elect(deltas, b, x.weights, p.normalize, p.lambda_))


def _elect(deltas: list[torch.Tensor], b: torch.Tensor, weights: list[float], normalize: bool,
           lam: float) -> torch.Tensor:
    """One block of the TIES result from its trimmed task vectors (consumed) and base ``b``."""
    mixed = elect_and_mean(deltas, weights, normalize)
    return (mixed if lam == 1 else mixed.mul_(lam)).add_(b)


def ties_two_pass(x: TensorInputs) -> torch.Tensor:
    """TIES in two block-wise passes: the thresholds (and L1 sums for ``rescale``) by
    :func:`~expertkit.merge.methods.blockwise.kth_largest_magnitudes`, then the trimmed, elected
    merge (reading every input a second time). The ``rescale`` path, and the reference the
    one-pass path is measured against (bench/merge_blocks.py)."""
    p, wd = x.params, x.work_dtype
    base = flat(x.base)
    n = base.numel()
    cuts: list[tuple[float | None, float]] = []  # per model: (threshold or None: keep all, rescale factor)
    trimmed = [i for i, pm in enumerate(x.per_model) if 0 < pm.density < 1 and n > 0]
    found = kth_largest_magnitudes([flat(x.tensors[i]) for i in trimmed], base,
                                   [max(1, int(x.per_model[i].density * n)) for i in trimmed], wd, l1=p.rescale)
    by_model = dict(zip(trimmed, found, strict=True))
    for i, pm in enumerate(x.per_model):
        if i in by_model:
            thr, l1, l1_kept = by_model[i]
            cuts.append((thr, l1 / l1_kept if p.rescale and l1_kept > 0 else 1.0))
        else:  # density >= 1 keeps everything, <= 0 nothing
            cuts.append((None, 1.0) if pm.density >= 1 or n == 0 else (float("inf"), 1.0))

    def merge(blocks: list[torch.Tensor]) -> torch.Tensor:
        b = blocks[-1].to(wd)  # (block,)
        deltas = []
        for blk, (thr, factor) in zip(blocks[:-1], cuts, strict=True):
            d = trim(delta_block(blk, b, wd), thr)
            if factor != 1.0:
                d.mul_(factor)
            deltas.append(d)
        return _elect(deltas, b, x.weights, p.normalize, p.lambda_)

    out = torch.empty(x.base.shape, dtype=x.out_dtype or wd)
    return blockwise(out, [*x.tensors, x.base], merge)
