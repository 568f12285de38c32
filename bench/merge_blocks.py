"""Micro-benchmark behind ``merge/methods/blockwise.py``: whole-tensor vs block-wise element-wise merges.

    flock /tmp/expertkit-bench.lock .venv/bin/python bench/merge_blocks.py [--numel 65011712] [--repeats 3]

On three bfloat16 tensors of ``--numel`` elements (default: 65M, a 1.1B model's ``lm_head``,
32000 x 2048, and the largest tensor of the 1.1B bench zoo) and a base, it times in one process:

* ``linear``: the weighted mean written as bfloat16, (a) as whole-tensor ops (float32 copies of
  every input, the sum, the cast), (b) block by block with torch's own intra-op threads, (c) block
  by block spread over ``torch.get_num_threads()`` Python threads (what ``linear`` does);
* ``ties threshold``: the k-th largest task-vector magnitude of each model (density 0.2), by
  ``torch.kthvalue`` over each whole task vector against
  :func:`~expertkit.merge.methods.blockwise.kth_largest_magnitudes` (sample + one counting pass);
* ``ties``: a whole TIES merge of that tensor, whole-tensor maths (``kthvalue``, masks, election
  over full float32 tensors) against the block-wise method in two passes (thresholds, then the
  merge, each reading every input: :func:`~expertkit.merge.methods.ties.ties_two_pass`, the
  structure before the one-pass rewrite, with today's kernels) and as shipped (one pass plus a
  fix-up near the thresholds: :func:`~expertkit.merge.methods.blockwise.trimmed_merge`).

Each variant runs ``--repeats`` times in alternating order; the table shows the median and checks
that the variants give equal results. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch

from expertkit.merge.core import get_method, merge_tensor
from expertkit.merge.methods import blockwise as bw
from expertkit.merge.methods.base import elect_and_mean, weighted_sum
from expertkit.merge.methods.ties import ties_two_pass


def _blocks_torch_threads(out: torch.Tensor, xs: list[torch.Tensor], fn: Callable) -> torch.Tensor:
    """(b): blocks in order on this thread, each op using torch's own threads."""
    dst, views = out.view(-1), [x.reshape(-1) for x in xs]
    for s, e in bw.spans(dst.numel()):
        dst[s:e] = fn([v[s:e] for v in views])
    return out


def _whole_ties(models: list[torch.Tensor], base: torch.Tensor, density: float) -> torch.Tensor:
    b = base.float()
    deltas = []
    for m in models:
        d = m.float() - b
        mag = d.abs().reshape(-1)
        thr = torch.kthvalue(mag, mag.numel() - max(1, int(density * mag.numel())) + 1).values
        deltas.append(d.masked_fill_(d.abs() < thr, 0))
    return elect_and_mean(deltas, [1.0] * len(models), True).add_(b).to(base.dtype)


def main() -> None:
    """Run the variants and print a markdown table of medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=32000 * 2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.numel, generator=g).mul_(0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(args.numel, generator=g).mul_(2e-4)).to(torch.bfloat16) for _ in range(3)]
    w = [1.0, 1.0, 1.0]
    mean = lambda blocks: weighted_sum(blocks, w, True, torch.float32)  # noqa: E731
    k = max(1, int(0.2 * args.numel))
    ties = get_method("ties")
    two_pass = dataclasses.replace(ties, fn=ties_two_pass)
    tp = ties.params.model_validate({"density": 0.2})
    variants: dict[str, dict[str, Callable[[], object]]] = {
        "linear": {
            "whole tensors": lambda: weighted_sum([m.float() for m in models], w, True, torch.float32).to(torch.bfloat16),
            "blocks, torch threads": lambda: _blocks_torch_threads(torch.empty_like(base), models, mean),
            "blocks on a thread pool": lambda: bw.blockwise(torch.empty_like(base), models, mean),
        },
        "ties threshold": {
            "kthvalue per model": lambda: [float(torch.kthvalue((m.float() - base.float()).abs_(), args.numel - k + 1)
                                                 .values) for m in models],
            "sample + counting pass": lambda: [t for t, _, _ in bw.kth_largest_magnitudes(models, base, [k] * 3,
                                                                                          torch.float32)],
        },
        "ties": {
            "whole tensors": lambda: _whole_ties(models, base, 0.2),
            "blocks, two passes": lambda: merge_tensor(two_pass, "w", models, base, weights=w, params=tp),
            "blocks, one pass + fix-up": lambda: merge_tensor(ties, "w", models, base, weights=w, params=tp),
        },
    }
    print(f"load average before: {os.getloadavg()}, torch threads: {torch.get_num_threads()}")
    print("| merge | variant | median s | runs (s) | equal to the first |")
    print("|---|---|---:|---|---|")
    for group, fns in variants.items():
        times: dict[str, list[float]] = {v: [] for v in fns}
        results: dict[str, object] = {}
        for r in range(args.repeats):
            for v in fns if r % 2 == 0 else list(reversed(fns)):
                t0 = time.perf_counter()
                results[v] = fns[v]()
                times[v].append(time.perf_counter() - t0)
        first = results[next(iter(fns))]
        for v, ts in times.items():
            res = results[v]
            same = torch.equal(res, first) if isinstance(res, torch.Tensor) else res == first
            print(f"| {group} | {v} | {statistics.median(ts):.3f} | {', '.join(f'{t:.3f}' for t in ts)} | {same} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
