"""Block-by-block evaluation of element-wise merges, and the exact k-th largest task-vector magnitude.

Why (measured on a 1.1B-parameter bfloat16 zoo, docs/benchmarks.md): a whole-tensor merge makes
every step a pass over memory (bfloat16 to float32 copies of each input, the task vectors, masks,
sums, the float32 result and its cast), and ``torch.kthvalue`` over a whole task vector is a
single-threaded selection that dominated TIES. Here the element-wise part runs on blocks of
:data:`BLOCK` elements that stay in cache, inputs are only read (so the executor can hand over
memory-mapped views), the result is written in its output dtype, and the top-k threshold is
found from a sample plus one counting pass over a narrow band (:func:`kth_largest_magnitude`),
which TIES merges in at once (:func:`trimmed_merge`).

Blocks run on a pool of ``torch.get_num_threads()`` Python threads, each op single-threaded (torch
releases the GIL): measured on 2 cores by an earlier session, the mean of three 65M-element
bfloat16 tensors took 1.25 s as whole-tensor ops, 0.99 s in blocks of 2^17 with torch's own
threads (a fork/join per small op) and 0.32 s with blocks spread over threads. The command that
measures these variants (and the threshold and TIES ones) is ``bench/merge_blocks.py``; the
figures are to be remeasured with it (docs/benchmarks.md).

Element by element the arithmetic is the whole-tensor one, in the same order, so the results do
not depend on the block size or on the threads.

Trimming (``|d| < threshold`` set to 0) uses ``hardshrink`` with the float just below the
threshold (one vectorised op; measured on one core for 2^17 float32 elements, ``abs``, ``<`` and
``masked_fill_`` took about 1.4 ms, ``hardshrink`` 0.03 ms), and counting uses ``count_nonzero``
of such a tensor, for the same reason: torch's CPU comparisons into bool tensors and
``masked_fill_`` are not vectorised (a count is the float sum of 1.0 / 0.0 flags). A NaN
magnitude is never trimmed and not counted.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
import torch.nn.functional as F

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


def trim(d: torch.Tensor, thr: float | None) -> torch.Tensor:
    """``d`` with every element of ``|d| < thr`` set to 0 (NaN kept): a new tensor, or ``d`` itself
    when nothing is trimmed (``thr`` None, NaN or at most 0). Bit for bit
    ``d.masked_fill(d.abs() < thr, 0)``, as one ``hardshrink`` (which zeroes ``|d| <= lambd``) with
    ``lambd`` the number of ``d``'s dtype just below ``thr``."""
    if thr is None or not thr > 0:
        return d
    return F.hardshrink(d, _just_below(thr, d.dtype))


@functools.lru_cache(maxsize=256)
def _just_below(x: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` below ``x`` (``x`` a number of ``dtype``)."""
    return float(torch.nextafter(torch.tensor(x, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))


def _count(flags: torch.Tensor) -> float:
    """The sum of a tensor of -1.0, 0.0 and 1.0: vectorised, exact (float64 from 2^24 elements)."""
    return float(flags.sum(dtype=torch.float64 if flags.numel() >= 1 << 24 else None))


def _tally(d: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, int, int, torch.Tensor, torch.Tensor]:
    """One block of one task vector ``d`` against the bracket ``[lo, hi]``: ``(trim(d, hi), count
    above hi, count equal to hi, magnitudes in [lo, hi), their positions)``; NaN is in none of them.

    The counts are sums of ``sign``s, not of comparisons (see the module notes): with ``f =
    |trim(d, hi)|``, in ``{0} U [hi, inf]``, ``sum(sign(f))`` counts ``|d| >= hi`` and
    ``sum(sign(f - hi))`` is the count above ``hi`` minus the zeros. ``sign(NaN)`` is 0, so a block
    with a NaN (``sum(f)`` is NaN), or an infinite or zero ``hi``, takes plain comparisons."""
    kept = trim(d, hi)  # (block,): |d| >= hi kept, the rest 0
    f = kept.abs()
    if 0 < hi < math.inf and not math.isnan(float(f.sum())):
        at_or_above = int(_count(torch.sign(f)))
        over = int(_count(f.sub_(hi).sign_())) + f.numel() - at_or_above  # the sum is over - (n - at_or_above)
        at_hi = at_or_above - over
    else:
        mag = d.abs()
        over = int(torch.count_nonzero(mag > hi))
        at_hi = int(torch.count_nonzero(mag == hi))
    if lo > 0:  # nonzero where lo <= |d| < hi (and where both keep inf or NaN: filtered below)
        pos = torch.nonzero(trim(d, lo).sub_(kept)).view(-1)
        mags = d.index_select(0, pos).abs_()
        inside = (mags >= lo) & (mags < hi)
        if not bool(inside.all()):
            pos, mags = pos[inside], mags[inside]
    else:  # the bracket reaches 0: every magnitude below hi is inside
        pos = torch.nonzero(d.abs() < hi).view(-1)
        mags = d.index_select(0, pos).abs_()
    return kept, over, at_hi, mags, pos


def _sample(n: int, m: int, g: torch.Generator) -> torch.Tensor | slice:
    """``m`` of ``range(n)`` to sample: random positions for a tensor that fits the caches, else
    every ``s``-th from a random start with ``s`` a prime, so that the sample meets every column of
    a weight matrix (rows of power-of-two-times-small lengths) and costs a strided read instead of
    ``m`` cache misses (measured: 0.6 ms instead of 6.6 ms for 2^16 of 4M bfloat16 elements)."""
    if m >= n:
        return slice(0, n)
    if n < 8 * m:
        return torch.randint(0, n, (m,), generator=g)
    step = n // m
    while any(step % p == 0 for p in range(2, math.isqrt(step) + 1)):
        step -= 1  # the largest prime <= n // m (n // m >= 8)
    start = int(torch.randint(0, n - step * (m - 1), (1,), generator=g))
    return slice(start, start + step * (m - 1) + 1, step)


class _Band:
    """One model's magnitudes in its bracket ``[lo, hi)`` and their block-relative positions, gathered
    from every block into two buffers allocated before the pass.

    Why (measured, issue 21): keeping each block's result as its own small tensors (even empty ones)
    until the pass ends fragments glibc's heap: the next blocks' freed temporaries cannot be reused
    around them and the heap grows by about a block's working set per block. On a 65M-element
    bfloat16 tensor of three models that was 1.2-1.5 GB of resident memory for empty brackets, the
    whole of TIES' peak-memory regression. So a block keeps only Python integers (``(start,
    count)`` in these buffers), and its bracket is copied in at a reserved offset.

    ``capacity`` is an upper bound from the sample; a pass that finds more (``overflow``) cannot
    use the buffers and its caller falls back to the exact path."""

    def __init__(self, capacity: int, dtype: torch.dtype) -> None:
        self.mags = torch.empty(capacity, dtype=dtype)
        self.pos = torch.empty(capacity, dtype=torch.int32)  # positions within a block (< BLOCK)
        self.used, self.overflow = 0, False
        self._lock = threading.Lock()

    @classmethod
    def for_bracket(cls, n: int, fraction: float, dtype: torch.dtype) -> _Band:
        """A store for a tensor of ``n`` elements whose sample had ``fraction`` of its elements in
        the bracket: room for the sample's count plus six standard deviations, and a floor."""
        m = min(n, SAMPLE)
        c = fraction * m
        return cls(min(n, math.ceil(n * (c + 6 * math.sqrt(c) + 8) / m)), dtype)

    def put(self, mags: torch.Tensor, pos: torch.Tensor) -> tuple[int, int]:
        """Store one block's bracket; ``(start, count)`` in the buffers (``count`` -1 on overflow)."""
        k = mags.numel()
        if k == 0:
            return 0, 0
        with self._lock:
            start = self.used
            if start + k > self.mags.numel():
                self.overflow = True
                return 0, -1
            self.used = start + k
        self.mags[start:start + k] = mags
        self.pos[start:start + k] = pos
        return start, k

    def all_mags(self) -> torch.Tensor:
        """Every stored magnitude (a view; the blocks' order, which no caller depends on)."""
        return self.mags[:self.used]

    def block(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's ``(magnitudes, positions)`` (views)."""
        return self.mags[start:start + count], self.pos[start:start + count]


def _brackets(models: Sequence[torch.Tensor], base: torch.Tensor, ks: Sequence[int], wd: torch.dtype,
              seed: int) -> list[tuple[float, float, float]]:
    """Per model ``(lo, hi, fraction)``: ranks around ``k`` bracketed from a sample of :data:`SAMPLE`
    elements (a margin of five standard deviations of the sample rank; two ``kthvalue`` selections,
    5x faster than sorting the sample), and the fraction of the sample in ``[lo, hi)``."""
    n = base.numel()
    m = min(n, SAMPLE)
    idx = _sample(n, m, torch.Generator().manual_seed(seed))
    b_sample = base[idx].to(wd)
    brackets = []
    for model, k in zip(models, ks, strict=True):
        sample = torch.sub(model[idx].to(wd), b_sample).abs_()  # (m,)
        if bool(sample.isnan().any()):  # NaN is not counted: rank among the rest
            sample = sample[~sample.isnan()]
        mf = sample.numel()
        if mf == 0:
            brackets.append((-math.inf, math.inf, 1.0))
            continue
        nf = n * mf / m  # about the number of magnitudes that are not NaN
        below = max(0.0, (nf - k) / nf)  # about the fraction of them strictly below the k-th largest
        margin = 5.0 * (mf * below * (1 - below)) ** 0.5 + 8
        # the i-th smallest (0-based) is kthvalue(i + 1)
        lo = (float(torch.kthvalue(sample, int(below * mf - margin) + 1).values) if below * mf - margin > 0
              else -math.inf)
        hi = (float(torch.kthvalue(sample, int(below * mf + margin) + 1).values) if below * mf + margin < mf - 1
              else math.inf)
        brackets.append((lo, hi, float(((sample >= lo) & (sample < hi)).sum()) / m))
    return brackets


def _threshold_in(k: int, hi: float, counts: Sequence[tuple[int, int]], inside: torch.Tensor) -> float | None:
    """The ``k``-th largest magnitude from one model's per-block counts ``(above hi, equal to hi)``
    and all its magnitudes in ``[lo, hi)`` (``inside``), or None where it is not in ``[lo, hi]``."""
    above, at_hi = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if above < k <= above + at_hi:
        return hi
    rank = k - above - at_hi  # the threshold is the rank-th largest of ``inside``
    if not 0 < rank <= inside.numel():
        return None
    return float(torch.kthvalue(inside, inside.numel() - rank + 1).values)


def kth_largest_magnitudes(models: Sequence[torch.Tensor], base: torch.Tensor, ks: Sequence[int], wd: torch.dtype,
                           l1: bool = False, seed: int = 0) -> list[tuple[float, float, float]]:
    """Per model, ``(threshold, l1_all, l1_kept)`` of the task vector ``model - base`` (1-D views).

    ``threshold`` is exactly the ``k``-th largest ``|d|`` (``torch.kthvalue`` of the whole ``|d|``
    gives the same number). With ``l1``, ``l1_all`` is ``sum |d|`` and ``l1_kept`` the sum over
    ``|d| >= threshold`` (for mergekit's L1 ``rescale``), in float64; else both are 0.

    How: for each model the ranks around ``k`` are bracketed by ``[lo, hi]`` from a sample of
    :data:`SAMPLE` elements (a margin of five standard deviations of the sample rank); one
    blockwise pass over all the models (the base converted once per block) counts the elements
    above and at ``hi`` and collects those in ``[lo, hi)`` (1-2% of them for continuous values);
    the threshold is ``hi`` or the right order statistic of that small set. Where a bracket
    misses (probability far below 1e-6), that model's whole ``|d|`` is selected with
    ``torch.kthvalue`` instead.
    """
    brackets = _brackets(models, base, ks, wd, seed)
    n = base.numel()
    bands = [_Band.for_bracket(n, f, wd) for _, _, f in brackets]

    def count(s: int, e: int) -> list[tuple[int, int, int, float, float]]:
        b = base[s:e].to(wd)
        out = []
        for model, (lo, hi, _), band in zip(models, brackets, bands, strict=True):
            d = torch.sub(model[s:e].to(wd), b)  # (block,)
            kept, over, at_hi, mags, pos = _tally(d, lo, hi)
            _, stored = band.put(mags, pos)
            sums = ((float(d.abs().sum(dtype=torch.float64)), float(kept.abs().sum(dtype=torch.float64)))
                    if l1 else (0.0, 0.0))
            out.append((over, at_hi, stored, *sums))
        return out

    parts = map_blocks(n, count)
    results = []
    for i, (model, k) in enumerate(zip(models, ks, strict=True)):
        tallies = [p[i] for p in parts]
        band = bands[i]
        thr = None if band.overflow else _threshold_in(k, brackets[i][1], tallies, band.all_mags())
        l1_all = sum(t[3] for t in tallies)
        if thr is not None:
            inside = band.all_mags()
            kept = sum(t[4] for t in tallies) + float(inside[inside >= thr].sum(dtype=torch.float64)) if l1 else 0.0
        else:  # the bracket missed (or held more than the sample promised): select over everything (but NaN)
            mag = delta_block(model, base, wd).abs_()
            mag = mag[~mag.isnan()] if bool(mag.isnan().any()) else mag
            thr = float(torch.kthvalue(mag, max(1, mag.numel() - k + 1)).values) if mag.numel() else 0.0
            kept = float(mag[mag >= thr].sum(dtype=torch.float64)) if l1 else 0.0
        results.append((thr, l1_all, kept))
    return results


def kth_largest_magnitude(model: torch.Tensor, base: torch.Tensor, k: int, wd: torch.dtype,
                          seed: int = 0) -> tuple[float, float, float]:
    """:func:`kth_largest_magnitudes` of one model, with the L1 sums."""
    return kth_largest_magnitudes([model], base, [k], wd, l1=True, seed=seed)[0]


def blockwise(out: torch.Tensor, inputs: Sequence[torch.Tensor],
              fn: Callable[[list[torch.Tensor]], torch.Tensor],
              into: Callable[[list[torch.Tensor], torch.Tensor], object] | None = None) -> torch.Tensor:
    """``out[s:e] = fn([x[s:e] for x in inputs])`` block by block over the flattened tensors, on
    :func:`map_blocks`'s threads (``fn`` returns a block in any dtype; it is cast into ``out``;
    it must only read shared state). Returns ``out``.

    With ``into``, ``into(blocks, out[s:e])`` writes each block's result itself (the same numbers
    as ``fn``'s), sparing a block-sized temporary and its copy when ``out`` has the working dtype."""
    views = [flat(t) for t in inputs]
    dst = out.view(-1)

    def one(s: int, e: int) -> None:
        if into is not None:
            into([v[s:e] for v in views], dst[s:e])
        else:
            dst[s:e] = fn([v[s:e] for v in views])

    map_blocks(dst.numel(), one)
    return out


#: above this expected fraction of elements in ``[lo, hi)`` (summed over the models, from the
#: samples), :func:`trimmed_merge` makes two passes instead of one pass plus a fix-up
MAX_BAND = 0.25


def trimmed_merge(out: torch.Tensor, models: Sequence[torch.Tensor], base: torch.Tensor, ks: Sequence[int | None],
                  wd: torch.dtype, merge: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
                  seed: int = 0) -> torch.Tensor:
    """``out = merge([trim_i(models[i] - base)], base)``, reading every input once (plus a few elements).

    ``trim_i`` zeroes the elements of task vector ``i`` (in ``wd``) whose magnitude is below the
    ``ks[i]``-th largest magnitude of the whole task vector (:func:`kth_largest_magnitudes`'s;
    ties with it are kept); ``ks[i]`` None keeps everything, ``0`` or less nothing (threshold
    +inf). ``merge(deltas, b)`` gets one block's trimmed task vectors and its base in ``wd`` (it
    may modify them) and returns that block's result in any dtype (cast into ``out``). It must be
    **element-wise**: element ``j`` of its result depends only on element ``j`` of its inputs
    (TIES' election is). Returns ``out``.

    Why (issue 21: a 1.1B TIES spent 52 of 77 s in the two passes a threshold needs, counting and
    then the masked merge, each reading and differencing every input): a threshold is known only
    after a pass over the whole tensor, but it lies inside its sample's bracket ``[lo, hi]``. So
    one pass merges each block at once with ``|d| >= hi`` as the trimming rule, counts the
    elements above and at ``hi`` and records the positions of those in ``[lo, hi)`` (1-2% of the
    elements for continuous values; often none for bfloat16 task vectors, whose magnitudes take
    few values: then ``hi`` is tied by many elements and is the threshold itself). That rule is
    exact wherever the threshold is ``hi``; otherwise only the recorded elements at or above the
    threshold were trimmed wrongly, and those alone are gathered from the inputs and merged again
    (the same element-wise operations on the same numbers: the same bits). If a bracket missed,
    or the samples put too many elements in the brackets (:data:`MAX_BAND`), every block is merged
    again with the exact thresholds.
    """
    views, bview, dst = [flat(t) for t in models], flat(base), out.view(-1)
    n = dst.numel()
    find = [i for i, k in enumerate(ks) if k is not None and k > 0 and n > 0]
    brackets = dict(zip(find, _brackets([views[i] for i in find], bview, [ks[i] for i in find], wd, seed),
                        strict=True))
    thresholds: list[float | None] = [None if k is None else math.inf for k in ks]  # final but for ``find``

    def exact(s: int, e: int, pos: torch.Tensor | None = None) -> None:
        """Merge block ``[s, e)`` (only its elements ``pos``, when given) with the final thresholds."""
        take = (lambda v: v[s:e]) if pos is None else (lambda v: v[s:e].index_select(0, pos))
        b = take(bview).to(wd)  # (block,) or (len(pos),)
        result = merge([trim(torch.sub(take(v).to(wd), b), thr) for v, thr in zip(views, thresholds, strict=True)], b)
        if pos is None:
            dst[s:e] = result
        else:
            dst[s:e].index_copy_(0, pos, result.to(dst.dtype))

    def two_passes() -> torch.Tensor:
        found = kth_largest_magnitudes([views[i] for i in find], bview, [ks[i] for i in find], wd, seed=seed)
        for i, (thr, _, _) in zip(find, found, strict=True):
            thresholds[i] = thr
        map_blocks(n, exact)
        return out

    if not find or sum(f for _, _, f in brackets.values()) > MAX_BAND:  # thresholds first, then merge
        return two_passes()

    bands = {i: _Band.for_bracket(n, brackets[i][2], wd) for i in find}

    def one_pass(s: int, e: int) -> list[tuple[int, int, int, int]]:
        """Merge block ``[s, e)`` with ``|d| >= hi`` as the rule; per bracketed model only integers are
        kept (above ``hi``, at ``hi``, and where the bracket's elements went in its store)."""
        b = bview[s:e].to(wd)  # (block,)
        deltas, tallies = [], []
        for i, v in enumerate(views):
            d = torch.sub(v[s:e].to(wd), b)  # (block,)
            if i in brackets:
                kept, over, at_hi, mags, pos = _tally(d, *brackets[i][:2])
                tallies.append((over, at_hi, *bands[i].put(mags, pos)))
                deltas.append(kept)  # |d| >= hi kept; [lo, hi) merged again below if the threshold is lower
            else:
                deltas.append(trim(d, thresholds[i]))
        dst[s:e] = merge(deltas, b)
        return tallies

    parts = dict(zip(spans(n), map_blocks(n, one_pass), strict=True))  # (s, e) -> per bracketed model
    if any(bands[i].overflow for i in find):  # more in a bracket than the sample promised
        return two_passes()
    for j, i in enumerate(find):
        thresholds[i] = _threshold_in(ks[i], brackets[i][1], [p[j] for p in parts.values()], bands[i].all_mags())
    if any(thresholds[i] is None for i in find):  # a bracket missed: the first pass trimmed wrongly
        return two_passes()
    redo = [(j, i, thresholds[i]) for j, i in enumerate(find) if thresholds[i] < brackets[i][1]]

    def fix(s: int, e: int) -> None:
        """Merge again the elements of block ``[s, e)`` that the first pass trimmed although they
        are at or above their model's threshold."""
        wrong = torch.zeros(e - s, dtype=torch.bool)
        for j, i, thr in redo:
            _, _, start, count = parts[(s, e)][j]
            mags, pos = bands[i].block(start, count)
            wrong[pos[mags >= thr].long()] = True
        pos = torch.nonzero(wrong).view(-1)
        if pos.numel():
            exact(s, e, pos)

    if redo:
        map_blocks(n, fix)
    return out
