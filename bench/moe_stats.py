"""Cost of the routing-statistics pass against a plain forward pass, and MoE forward time against the dense base.

    flock /tmp/expertkit-bench.lock .venv/bin/python bench/moe_stats.py [--model FOLDER] [--n 16] [--reps 3]

In one process, on the same prompts (``--n`` validation prompts of each of the MoE's cluster tasks,
batches of 8): (a) plain forward passes of the MoE under ``torch.no_grad``; (b) the statistics pass
(:func:`expertkit.moe.collect_routing_stats`: the same forward passes with the router hooks and
the expert-output sample); (c) forward passes of the dense base. The three are interleaved
``--reps`` times (the machine is shared: a change of load hits every row) and the medians are
printed with the ratios (b)/(a) (goal: at most 1.15) and (a)/(c), and the load average.

``--model`` defaults to the MoE of the default recipe (``expertkit moe build``; built and cached on
first use, about an hour on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    """Parse arguments, time the three passes, print the medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="an MoE folder (default: the default recipe's MoE)")
    ap.add_argument("--n", type=int, default=16, help="prompts per task")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sample-tokens", type=int, default=16)
    args = ap.parse_args()

    import torch

    from expertkit.models import load_model
    from expertkit.moe import MoeBuildConfig, build_moe, collect_routing_stats, task_prompts
    from expertkit.moe.collect import _batches
    from expertkit.progress import set_quiet

    set_quiet(True)
    recipe = MoeBuildConfig()
    folder = args.model or str(build_moe(recipe).path)
    moe, base = load_model(folder), load_model(recipe.base)
    tasks = [t for c in recipe.clusters for t in c.tasks]
    prompts = task_prompts(tasks, args.n, "validation", 0)
    batches = [b for group in prompts.values() for b in _batches(moe.tokenizer, group, 8, 256)]
    tokens = sum(int(m.sum()) for _, m in batches)

    @torch.no_grad()
    def plain(model) -> float:
        started = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
        return time.perf_counter() - started

    def stats_pass() -> float:
        started = time.perf_counter()
        collect_routing_stats(moe.model, moe.tokenizer, prompts, batch_size=8, sample_tokens=args.sample_tokens)
        return time.perf_counter() - started

    load_before = os.getloadavg()[0]
    plain(moe.model), plain(base.model)  # warm-up
    rows: dict[str, list[float]] = {"moe forward": [], "stats pass": [], "dense base forward": []}
    for _ in range(args.reps):
        rows["moe forward"].append(plain(moe.model))
        rows["stats pass"].append(stats_pass())
        rows["dense base forward"].append(plain(base.model))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{len(batches)} batches, {tokens} real tokens, {len(tasks)} tasks x {args.n} prompts; "
          f"torch threads {torch.get_num_threads()}")
    for k, v in med.items():
        print(f"{k:>20}: {v:7.2f} s median of {args.reps} ({tokens / v:,.0f} tokens/s)")
    print(f"stats pass / MoE forward: {med['stats pass'] / med['moe forward']:.3f} (goal <= 1.15)")
    print(f"MoE forward / dense base forward: {med['moe forward'] / med['dense base forward']:.3f}")
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
