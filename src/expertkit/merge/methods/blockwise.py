"""Block-by-block evaluation of element-wise merges, and the exact k-th largest task-vector magnitude.

Why (measured on a 1.1B-parameter bfloat16 zoo, docs/benchmarks.md): a whole-tensor merge makes
every step a pass over memory (bfloat16 to float32 copies of each input, the task vectors, masks,
sums, the float32 result and its cast), and ``torch.kthvalue`` over a whole task vector is a
single-threaded selection that dominated TIES. Here the element-wise part runs on blocks of
:data:`BLOCK` elements that stay in cache, inputs are only read (so the executor can hand over
memory-mapped views), the result is written in its output dtype, and the top-k threshold is
found from a sample plus one counting pass over a narrow band (:func:`kth_largest_magnitude`).

Blocks run on a pool of ``torch.get_num_threads()`` Python threads, each op single-threaded (torch
releases the GIL): measured on 2 cores by an earlier session, the mean of three 65M-element
bfloat16 tensors took 1.25 s as whole-tensor ops, 0.99 s in blocks of 2^17 with torch's own
threads (a fork/join per small op) and 0.32 s with blocks spread over threads. The command that
measures these variants (and the threshold and TIES ones) is ``bench/merge_blocks.py``; the
figures are to be remeasured with it (docs/benchmarks.md).

Element by element the arithmetic is the whole-tensor one, in the same order, so the results do
not depend on the block size or on the threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

R = TypeVar("R")

#: elements per block: a few float32 blocks per input stay in the L2/L3 caches
BLOCK = 1 << 17
#: sample size of the threshold estimate
SAMPLE = 1 << 16


def spans(n: int, block: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive blocks (default :data:`BLOCK` elements) covering ``range(n)``."""
    block = block or BLOCK
    for start in range(0, n, block):
        yield start, min(n, start + block)


def map_blocks(n: int, fn: Callable[[int, int], R]) -> list[R]:
    """``[fn(s, e) for s, e in spans(n)]``, the blocks spread over ``torch.get_num_threads()``
    threads with torch's intra-op threads set to 1 meanwhile (restored after)."""
    blocks = list(spans(n))
    original = torch.get_num_threads()
    threads = min(original, len(blocks))
    if threads <= 1:
        return [fn(s, e) for s, e in blocks]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="merge-block") as pool:
            return list(pool.map(lambda se: fn(*se), blocks))
    finally:
        torch.set_num_threads(original)


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 1-D view (a copy only for a non-contiguous tensor)."""
    return t.reshape(-1)


def delta_block(t: torch.Tensor, base: torch.Tensor, wd: torch.dtype) -> torch.Tensor:
    """``t - base`` of one block in the working dtype (both already 1-D slices); a new tensor."""
    return torch.sub(t.to(wd), base.to(wd))


def kth_largest_magnitudes(models: Sequence[torch.Tensor], base: torch.Tensor, ks: Sequence[int], wd: torch.dtype,
                           l1: bool = False, seed: int = 0) -> list[tuple[float, float, float]]:
    """Per model, ``(threshold, l1_all, l1_kept)`` of the task vector ``model - base`` (1-D views).

    ``threshold`` is exactly the ``k``-th largest ``|d|`` (``torch.kthvalue`` of the whole ``|d|``
    gives the same number). With ``l1``, ``l1_all`` is ``sum |d|`` and ``l1_kept`` the sum over
    ``|d| >= threshold`` (for mergekit's L1 ``rescale``), in float64; else both are 0.

    How: for each model the ranks around ``k`` are bracketed by ``[lo, hi]`` from a sample of
    :data:`SAMPLE` elements (a margin of five standard deviations of the sample rank); one
    blockwise pass over all the models (the base converted once per block) counts the elements
    above ``hi`` and collects those inside the bracket (about 1e-3 of them); the threshold is the
    right order statistic of that small set. Where a bracket misses (probability far below 1e-6),
    that model's whole ``|d|`` is selected with ``torch.kthvalue`` instead.
    """
    n = base.numel()
    g = torch.Generator().manual_seed(seed)
    m = min(n, SAMPLE)
    idx = torch.randint(0, n, (m,), generator=g) if m < n else torch.arange(n)
    b_sample = base[idx].to(wd)
    brackets = []
    for model, k in zip(models, ks, strict=True):
        sample = torch.sort(torch.sub(model[idx].to(wd), b_sample).abs_()).values  # (m,)
        below = (n - k) / n  # about the fraction of elements strictly below the k-th largest
        margin = 5.0 * (m * below * (1 - below)) ** 0.5 + 8
        lo = float(sample[int(below * m - margin)]) if below * m - margin > 0 else float("-inf")
        hi = float(sample[int(below * m + margin)]) if below * m + margin < m - 1 else float("inf")
        brackets.append((lo, hi))

    def count(s: int, e: int) -> list[tuple[int, float, float, torch.Tensor]]:
        b = base[s:e].to(wd)
        out = []
        for model, (lo, hi) in zip(models, brackets, strict=True):
            mag = torch.sub(model[s:e].to(wd), b).abs_()  # (block,)
            over = mag > hi
            sums = ((float(mag.sum(dtype=torch.float64)), float(mag.mul(over).sum(dtype=torch.float64)))
                    if l1 else (0.0, 0.0))
            band = torch.masked_select(mag, (mag >= lo) & (mag <= hi))
            out.append((int(torch.count_nonzero(over)), *sums, band))
        return out

    parts = map_blocks(n, count)
    results = []
    for i, (model, k) in enumerate(zip(models, ks, strict=True)):
        above = sum(p[i][0] for p in parts)
        l1_all, l1_hi = sum(p[i][1] for p in parts), sum(p[i][2] for p in parts)
        inside = torch.cat([p[i][3] for p in parts])  # (few,)
        if above < k <= above + inside.numel():
            thr = torch.kthvalue(inside, inside.numel() - (k - above) + 1).values
            kept = l1_hi + float(inside[inside >= thr].sum(dtype=torch.float64)) if l1 else 0.0
        else:  # the bracket missed: select over everything
            mag = delta_block(model, base, wd).abs_()
            thr = torch.kthvalue(mag, n - k + 1).values
            kept = float(mag[mag >= thr].sum(dtype=torch.float64)) if l1 else 0.0
        results.append((float(thr), l1_all, kept))
    return results


def kth_largest_magnitude(model: torch.Tensor, base: torch.Tensor, k: int, wd: torch.dtype,
                          seed: int = 0) -> tuple[float, float, float]:
    """:func:`kth_largest_magnitudes` of one model, with the L1 sums."""
    return kth_largest_magnitudes([model], base, [k], wd, l1=True, seed=seed)[0]


def blockwise(out: torch.Tensor, inputs: Sequence[torch.Tensor],
              fn: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """``out[s:e] = fn([x[s:e] for x in inputs])`` block by block over the flattened tensors, on
    :func:`map_blocks`'s threads (``fn`` returns a block in any dtype; it is cast into ``out``;
    it must only read shared state). Returns ``out``."""
    views = [flat(t) for t in inputs]
    dst = out.view(-1)

    def one(s: int, e: int) -> None:
        dst[s:e] = fn([v[s:e] for v in views])

    map_blocks(dst.numel(), one)
    return out
