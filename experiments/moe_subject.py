"""The MoE subject: is the Branch-Train-MiX MoE built from SmolLM2-135M better than its dense parts?

    .venv/bin/python experiments/moe_subject.py [--n 300] [--experts-on all|own] [--out runs/experiments/moe_subject]

1. ``build_moe(MoeBuildConfig())``: the default recipe (8 experts of 2 tasks each, top-2), cached;
   its build time is the one recorded in docs/benchmarks.md.
2. The base, the MoE and the dense experts are scored on the same ``n`` test examples of each of the
   16 cluster tasks (``--experts-on all``: every expert on every task; ``own``: on its cluster's
   tasks only, a quarter of the time); held-out perplexity on BBC News test articles.
3. Paired tests (exact McNemar, paired bootstrap): the MoE against the base on the whole task mix
   and per task; the MoE against each dense expert on that expert's own tasks; the MoE against the
   best single dense expert on the mix (chosen on the validation split, never on test).
4. Routing: statistics over validation prompts of every task (entropy given the task against the
   marginal entropy; balance), heatmaps.

Why n = 300 per task: the claim to check is "the MoE beats the dense base on its task mix". With a
fifth of pairs discordant, 626 pairs detect a 5-point difference (alpha 0.05, power 0.8:
``mcnemar_sample_size(0.05, 0.2)``); 300 per task gives 4,800 pairs on the mix, enough for a
2-point difference there, and per task (300) a 7-point one with a quarter of pairs discordant.

Writes ``<out>/results.json``, ``<out>/usage.png``, ``<out>/tasks.png`` and prints the markdown for
docs/results.md. Every evaluation is cached (``<cache>/eval``), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _scores(model, task: str, split: str, n: int, seed: int) -> list[float]:
    from expertkit.models.bundled import cache_root
    from expertkit.tasks.evaluate import evaluate

    res = evaluate(model, None, task, split=split, n=n, seed=seed, batch_size=64, cache_dir=cache_root() / "eval")
    return res.scores


def main() -> None:  # noqa: PLR0915 - one linear experiment
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="test examples per task")
    parser.add_argument("--val-n", type=int, default=100, help="validation examples per task (choosing the best expert)")
    parser.add_argument("--experts-on", choices=["all", "own"], default="all")
    parser.add_argument("--blocks", type=int, default=64, help="held-out text blocks of 128 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/moe_subject"))
    args = parser.parse_args()

    from expertkit.models import load_model
    from expertkit.moe import MoeBuildConfig, build_moe, routing_stats
    from expertkit.moe.plots import task_heatmap, usage_heatmap
    from expertkit.tasks.paired import compare, compare_continuous, verdict
    from expertkit.tasks.perplexity import block_nll, heldout_blocks, perplexity

    args.out.mkdir(parents=True, exist_ok=True)
    recipe = MoeBuildConfig()
    started = time.perf_counter()
    built = build_moe(recipe)
    build_minutes = built.meta["seconds"] / 60
    print(f"MoE {built.path} ({'reused' if built.reused else 'built'}; build {build_minutes:.1f} min; "
          f"this call {(time.perf_counter() - started) / 60:.1f} min)")
    clusters = {c.name: list(c.tasks) for c in recipe.clusters}
    tasks = [t for ts in clusters.values() for t in ts]

    base, moe = load_model(recipe.base), load_model(built.path)
    scores: dict[str, dict[str, list[float]]] = {"base": {}, "moe": {}}
    val: dict[str, dict[str, list[float]]] = {}
    for task in tasks:
        scores["base"][task] = _scores(base, task, "test", args.n, args.seed)
        scores["moe"][task] = _scores(moe, task, "test", args.n, args.seed)
    for name, folder in built.dense_experts.items():
        expert = load_model(folder)
        on = tasks if args.experts_on == "all" else clusters[name]
        scores[f"expert:{name}"] = {t: _scores(expert, t, "test", args.n, args.seed) for t in on}
        if args.experts_on == "all":
            val[name] = {t: _scores(expert, t, "validation", args.val_n, args.seed) for t in tasks}
        del expert

    blocks = heldout_blocks(base.tokenizer, n_blocks=args.blocks)
    nll = {"base": block_nll(base.model, blocks), "moe": block_nll(moe.model, blocks)}
    for name, folder in built.dense_experts.items():
        nll[f"expert:{name}"] = block_nll(load_model(folder).model, blocks)

    stats = routing_stats(moe, tasks, n=64, split="validation", seed=args.seed)
    usage_heatmap(stats, args.out / "usage.png")
    task_heatmap(stats, args.out / "tasks.png")

    def pooled(label: str, which: list[str]) -> list[float]:
        return [s for t in which for s in scores[label][t]]

    claims = {}
    claims["moe_vs_base_mix"] = compare(pooled("moe", tasks), pooled("base", tasks), seed=args.seed)
    per_task = {t: compare(scores["moe"][t], scores["base"][t], seed=args.seed) for t in tasks}
    per_expert = {name: compare(pooled("moe", ts), pooled(f"expert:{name}", ts), seed=args.seed)
                  for name, ts in clusters.items()}
    best = None
    if val:  # the best single dense expert on the whole mix, chosen on validation
        best = max(val, key=lambda n: sum(sum(v) / len(v) for v in val[n].values()))
        claims["moe_vs_best_expert_mix"] = compare(pooled("moe", tasks), pooled(f"expert:{best}", tasks), seed=args.seed)
    ppl = {label: perplexity(v) for label, v in nll.items()}
    ppl_test = compare_continuous([-x for x in nll["moe"]], [-x for x in nll["base"]], seed=args.seed)

    acc = {label: {t: sum(v) / len(v) for t, v in rows.items()} for label, rows in scores.items()}
    result = {
        "recipe": recipe.fingerprint_fields(), "fingerprint": built.fingerprint, "build_minutes": build_minutes,
        "difference_ranks": built.meta["difference_ranks"], "n": args.n, "accuracy": acc,
        "mix_mean": {label: sum(pooled(label, list(rows))) / sum(len(v) for v in rows.values())
                     for label, rows in scores.items()},
        "claims": {k: v.as_dict() for k, v in claims.items()},
        "per_task": {t: r.as_dict() for t, r in per_task.items()},
        "per_expert": {n: r.as_dict() for n, r in per_expert.items()}, "best_expert_on_validation": best,
        "perplexity": ppl, "perplexity_blocks": args.blocks, "block_nll_moe_vs_base": ppl_test.as_dict(),
        "routing": stats.summary(),
        "routing_per_layer": {"marginal": stats.marginal_entropy().tolist(),
                              "conditional": stats.conditional_entropy().tolist(), "cv": stats.balance_cv().tolist()},
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")

    lines = ["| task | cluster | base | MoE | own dense expert | MoE - base (p) |", "|---|---|---:|---:|---:|---:|"]
    for name, ts in clusters.items():
        for t in ts:
            r = per_task[t]
            lines.append(f"| {t} | {name} | {acc['base'][t]:.3f} | {acc['moe'][t]:.3f} | "
                         f"{acc[f'expert:{name}'][t]:.3f} | {r.diff:+.3f} ({r.p_value:.2g}) |")
    lines += ["", "Verdicts:", ""]
    lines.append("- " + verdict("The MoE beats the dense base on its task mix", claims["moe_vs_base_mix"]))
    if best:
        lines.append("- " + verdict(f"The MoE beats the best single dense expert ({best}, chosen on validation) "
                                    "on the mix", claims["moe_vs_best_expert_mix"]))
    for name, r in per_expert.items():
        lines.append("- " + verdict(f"MoE vs dense expert {name} on its own tasks", r))
    lines.append("- " + verdict("The MoE has lower held-out NLL than the base (per 128-token block)", ppl_test,
                                test="Wilcoxon signed-rank"))
    lines += ["", "| model | held-out perplexity |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ppl.items()]
    s = stats.summary()
    lines += ["", f"Routing over validation prompts: H(E) = {s['marginal_entropy_bits']:.2f} bits (max "
              f"{s['max_entropy_bits']:.2f}), H(E | task) = {s['conditional_entropy_bits']:.2f} bits, balance CV "
              f"{s['balance_cv']:.2f} (means over layers)."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
