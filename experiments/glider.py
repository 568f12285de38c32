"""GLIDER on SmolLM2-135M: global + local routing over 10 LoRA experts against every baseline.

    .venv/bin/python experiments/glider.py [--n 200] [--out runs/experiments/glider]
    .venv/bin/python experiments/glider.py --smoke      # a tiny random llama, tiny n: checks the script

1. The library (expertkit.route.build_library, cached and resumable): one LoRA expert and its
   Phatgoose gates per held-in task (``HELD_IN``, 10 suite tasks).
2. Every method scores the same ``n`` test examples of each held-in and held-out task (``HELD_OUT``,
   4 suite tasks without an expert): GLIDER (alpha = the held-in preset on held-in tasks, the
   held-out preset on held-out ones, as the paper sets alpha per setting), GLIDER's global router
   alone, Phatgoose, Arrow (PEFT's router), LoraHub (fitted per task on 5 training examples),
   LoraRetriever-style top-1 retrieval, the uniform merge, the oracle expert (held-in only), the base.
3. Paired tests (exact McNemar, paired bootstrap) of GLIDER against each baseline, pooled over the
   held-in tasks and over the held-out ones; the global router's top-1 retrieval accuracy on the
   held-in queries; verdicts on the issue's three goals; a bar plot (``glider.png``).

Why n = 200 per task: pooled, 2,000 held-in pairs detect a 3-point difference with 10% of pairs
discordant (``mcnemar_sample_size(0.03, 0.1)`` = 868) and 800 held-out pairs a 5-point one with 15%
discordant (``mcnemar_sample_size(0.05, 0.15)`` = 468).

Writes ``<out>/results.json`` and ``<out>/glider.png`` and prints the markdown for docs/results.md.
Instructions are cached per query, experts per recipe and each (method, task) cell's scores in
``<out>/cells/``, so an interrupted run resumes where it stopped.

Cost on 2 quiet cores (estimated from the parts, not measured end to end): library about 1 h (10 x
60 LoRA steps at ~3.3 s, 10 x 40 gate steps); instructions for 2,850 queries at roughly 0.5-2 s each;
122 (method, task) cells of 200 examples, about 4-5 h with routing: 6-8 h in all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

BASELINES = ("global", "phatgoose", "arrow", "lorahub", "retrieval", "uniform", "oracle", "base")


def _args() -> argparse.Namespace:
    from expertkit.route import HELD_IN, HELD_OUT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="test examples per task (the same for every method)")
    p.add_argument("--held-in", nargs="+", default=list(HELD_IN), help="tasks with an expert")
    p.add_argument("--held-out", nargs="+", default=list(HELD_OUT), help="tasks without an expert")
    p.add_argument("--methods", nargs="+", default=["glider", *BASELINES])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: runs/experiments/glider (smoke: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="a tiny random llama, 2 experts, tiny n: checks the script")
    a = p.parse_args()
    if a.smoke:
        a.held_in, a.held_out, a.n = ["reverse_words", "leap_year"], ["gcd"], min(a.n, 3)  # short prompts: 256 positions
        a.out = a.out or Path(tempfile.mkdtemp(prefix="glider-smoke-"))
    a.out = a.out or Path("runs/experiments/glider")
    return a


class HashEmbedder:
    """Smoke runs only: a bag-of-words embedder (words hashed to 64 dimensions) instead of MiniLM."""

    def encode(self, sentences: list[str], **kwargs: object) -> np.ndarray:
        """Counts of hashed words, one row per sentence."""
        out = np.zeros((len(sentences), 64), dtype=np.float32)
        for i, s in enumerate(sentences):
            for w in s.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1.0
        return out


def _setup(args: argparse.Namespace) -> tuple[object, object, object, object]:
    """(loaded base, library, embedder, instruction writer)."""
    from expertkit.models import load_model
    from expertkit.models.embedder import load_embedder
    from expertkit.models.tiny import save_tiny
    from expertkit.route import InstructionWriter, LibraryConfig, build_library
    from expertkit.route.api import instruction_cache

    if args.smoke:
        model = str(args.out / "tiny") if (args.out / "tiny").is_dir() else str(save_tiny("llama", args.out / "tiny"))
        cfg = LibraryConfig(model=model, tasks=args.held_in, gates={"steps": 2, "batch_size": 2},
                            train={"steps": 2, "batch_size": 2, "rank": 2, "target_modules": ["q_proj", "v_proj"]})
        loaded = load_model(model)
        return loaded, build_library(loaded, cfg), HashEmbedder(), InstructionWriter(
            loaded, cache_dir=args.out / "instructions", max_new_tokens=4, template="Input: {query}\nTask:",
            max_query_chars=60)
    loaded = load_model("smollm2-135m")
    lib = build_library(loaded, LibraryConfig(tasks=args.held_in))
    return loaded, lib, load_embedder(), InstructionWriter(loaded, cache_dir=instruction_cache())


def _evaluate(args: argparse.Namespace, loaded, library, embedder, writer) -> dict[str, dict[str, list[float]]]:
    from expertkit.fileio import write_atomic
    from expertkit.route import RouteConfig
    from expertkit.route.api import make_router
    from expertkit.route.evaluate import evaluate_router
    from expertkit.tasks.base import get_task

    scores: dict[str, dict[str, list[float]]] = {m: {} for m in args.methods}
    for name in [*args.held_in, *args.held_out]:
        task = get_task(name)
        examples = task.examples("test", args.n, args.seed)  # the same examples for every method
        held_in = name in args.held_in
        for method in args.methods:
            if method == "oracle" and not held_in:
                continue
            cfg = RouteConfig(method=method, top_k=args.top_k, alpha="held_in" if held_in else "held_out",
                              seed=args.seed)
            key = {"library": str(library.root), "config": cfg.model_dump(mode="json"), "task": name, "n": args.n}
            cell = args.out / "cells" / f"{method}-{name}.json"  # a finished cell is kept: a rerun resumes
            if cell.is_file() and json.loads(cell.read_text()).get("key") == key:
                scores[method][name] = json.loads(cell.read_text())["scores"]
            else:
                router = make_router(loaded, library, cfg, embedder=embedder, writer=writer)
                got = [r.score for r in evaluate_router(router, task, examples, batch_size=args.batch_size)]
                cell.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(cell, json.dumps({"key": key, "scores": got}))
                scores[method][name] = got
            print(f"{method:>10} {name:<16} {np.mean(scores[method][name]):.3f}", flush=True)
    return scores


def _pooled(scores: dict[str, list[float]], tasks: list[str]) -> list[float]:
    return [x for t in tasks if t in scores for x in scores[t]]


def _plot(acc: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(acc)
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, (setting, color) in enumerate((("held_in", "tab:blue"), ("held_out", "tab:orange"))):
        vals = [acc[m].get(setting, np.nan) for m in methods]
        ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=setting.replace("_", "-"), color=color)
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylabel("mean accuracy")
    ax.set_title("GLIDER and baselines on SmolLM2-135M (same examples)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:  # noqa: PLR0915 - one linear experiment
    args = _args()
    from expertkit.route import RouteConfig
    from expertkit.route.api import global_top1, make_router
    from expertkit.tasks.paired import compare, verdict

    args.out.mkdir(parents=True, exist_ok=True)
    loaded, library, embedder, writer = _setup(args)
    scores = _evaluate(args, loaded, library, embedder, writer)
    settings = {"held_in": args.held_in, "held_out": args.held_out}
    acc = {m: {s: float(np.mean(_pooled(scores[m], ts))) for s, ts in settings.items() if _pooled(scores[m], ts)}
           for m in scores}
    paired: dict[str, dict[str, dict]] = {}
    lines = []
    if "glider" in scores:
        for s, ts in settings.items():
            paired[s] = {}
            for m in scores:
                if m == "glider" or not _pooled(scores[m], ts):
                    continue
                res = compare(_pooled(scores["glider"], ts), _pooled(scores[m], ts), seed=args.seed)
                paired[s][m] = res.as_dict()
                lines.append(verdict(f"GLIDER beats {m} ({s.replace('_', '-')})", res))
    router = make_router(loaded, library, RouteConfig(method="global", seed=args.seed), embedder=embedder, writer=writer)
    top1 = global_top1(router, library, args.held_in, n=args.n, seed=args.seed)
    goals = {}
    if {"glider", "oracle"} <= set(acc):
        ratio = acc["glider"]["held_in"] / max(acc["oracle"]["held_in"], 1e-9)
        goals["held_in_vs_oracle"] = {"ratio": ratio, "met": ratio >= 0.95}
    for peer in ("arrow", "base"):
        if {"glider", peer} <= set(acc) and "held_out" in acc["glider"]:
            p = paired["held_out"][peer]
            goals[f"held_out_vs_{peer}"] = {"diff": p["diff"], "diff_ci": p["diff_ci"], "met": p["diff"] >= 0}
    goals["global_top1"] = {"accuracy": top1["accuracy"], "met": top1["accuracy"] >= 0.9}
    result = {"n": args.n, "held_in": args.held_in, "held_out": args.held_out, "top_k": args.top_k,
              "library": str(library.root), "scores": scores, "accuracy": acc, "paired": paired,
              "global_top1": {k: top1[k] for k in ("accuracy", "n", "per_task")}, "goals": goals, "verdicts": lines,
              "smoke": args.smoke}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    _plot(acc, args.out / "glider.png")
    print(f"\n## GLIDER (n = {args.n} per task; command: experiments/glider.py"
          f"{' --smoke' if args.smoke else ''})\n")
    print("| method | held-in | held-out |\n|---|---:|---:|")
    for m, a in acc.items():
        print(f"| {m} | {a.get('held_in', float('nan')):.3f} | {a.get('held_out', float('nan')):.3f} |")
    print(f"\nGlobal router top-1 retrieval on held-in queries: {top1['accuracy']:.3f} (n = {top1['n']}).\n")
    for line in lines:
        print(f"- {line}")
    for name, g in goals.items():
        print(f"- goal {name}: {'met' if g['met'] else 'NOT met'} ({', '.join(f'{k} {v}' for k, v in g.items() if k != 'met')})")


if __name__ == "__main__":
    main()
