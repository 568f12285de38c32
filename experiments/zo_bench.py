"""ZO-Bench at small scale: zeroth-order LoRA fine-tuning vs first-order Adam vs zero-shot.

    .venv/bin/python experiments/zo_bench.py [--tasks family_relation leap_year] [--budget 40]
        [--batch 4] [--n 50] [--methods ...] [--out runs/experiments/zo_bench]

On the bundled SmolLM2-135M-Instruct, LoRA (rank 8 on q_proj/v_proj) is trained on each task
by every zeroth-order method and by first-order AdamW under the **same budget of forward
passes** (``--budget``): a ZO-SGD-type step costs two forwards, ZO-SGD-Cons five (two for
the estimate, three to pick among θ, θ - step, θ + step), a Forward-Grad step one jvp
(counted as one forward, though it costs about two), and an AdamW step one forward (its
backward pass comes on top and is not counted). Every method sees the same data order
(seed 0). Accuracy on the task's test split (``--n`` examples, 95% Wilson interval) is
compared with the base model zero-shot.

Learning rates: the ZO-SGD family and Forward-Grad use MeZO/ZO-Bench's LoRA default
(lr 1e-4, ε 1e-2); ZO-Adam and AdamW use 1e-3 and 2e-3 (Adam steps are scale-free).
Trained adapters and their evaluations are kept under ``--out``, so a rerun only prints.
Writes ``<out>/results.json`` and prints the markdown table for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TASKS = ["family_relation", "leap_year"]
METHODS = ["zo-sgd", "zo-sgd-sign", "zo-sgd-scalar-sign", "zo-sgd-mmt", "zo-sgd-cons", "zo-adam", "forward-grad",
           "adamw"]
FORWARDS_PER_STEP = {"zo-sgd-cons": 5, "forward-grad": 1, "adamw": 1}  # the rest: 2 (two-sided estimate)
LR = {"zo-adam": 1e-3, "adamw": 2e-3}  # the rest: 1e-4
LORA = {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "max_prompt_tokens": 96}


def settings(method: str, budget: int, batch: int, n: int) -> dict:
    """The train_lora settings of ``method`` under a budget of ``budget`` forward passes."""
    steps = max(1, budget // FORWARDS_PER_STEP.get(method, 2))
    params = {} if method == "adamw" else {"eps": 1e-2}
    return {**LORA, "steps": steps, "batch_size": batch, "lr": LR.get(method, 1e-4), "optimizer": method,
            "optimizer_params": params, "eval_n": n, "eval_split": "test", "save_every": 0, "seed": 0}


def run(args: argparse.Namespace) -> dict:
    """Train and evaluate every (task, method); return the results."""
    from expertkit.models import load_model
    from expertkit.tasks import evaluate, get_task
    from expertkit.train import train_lora

    base = load_model("smollm2-135m")
    results: dict = {"budget": args.budget, "batch": args.batch, "n": args.n, "tasks": {}}
    for name in args.tasks:
        task = get_task(name)
        zero = evaluate(base, None, task, split="test", n=args.n, seed=0)
        rows = {"zero-shot": {"accuracy": zero.accuracy, "ci": [zero.ci_low, zero.ci_high], "steps": 0,
                              "forwards": 0, "seconds": 0.0}}
        for method in args.methods:
            if args.only_finished and not (args.out / name / method / "expertkit.json").is_file():
                continue  # not trained (an interrupted run): left out of the table
            cfg = settings(method, args.budget, args.batch, args.n)
            started = time.perf_counter()
            res = train_lora(base, task, args.out / name / method, **cfg)
            m = res.metrics or {}
            rows[method] = {
                "accuracy": m.get("accuracy"), "ci": m.get("ci"), "steps": cfg["steps"], "lr": cfg["lr"],
                "forwards": cfg["steps"] * FORWARDS_PER_STEP.get(method, 2), "first_loss": res.losses[0],
                "final_loss": res.train_loss, "seconds": res.seconds, "wall": time.perf_counter() - started,
            }
            print(f"{name} {method}: acc {m.get('accuracy')} loss {res.losses[0]:.3f} -> {res.train_loss:.3f} "
                  f"({res.seconds:.0f} s)", flush=True)
            results["tasks"][name] = rows
            _save(args.out, results)  # partial results survive an interruption
        results["tasks"][name] = rows
    return results


def _save(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


def table(results: dict) -> str:
    """Markdown: one row per method, accuracy [95% CI] and loss per task."""
    tasks = list(results["tasks"])
    head = "| method | steps | " + " | ".join(f"{t} acc [95% CI] | {t} loss first -> last" for t in tasks) + " |"
    lines = [head, "|---|---:|" + "---|---|" * len(tasks)]
    methods = list(dict.fromkeys(m for rows in results["tasks"].values() for m in rows))
    for method in methods:
        cells = []
        for t in tasks:
            r = results["tasks"][t].get(method)
            if r is None:
                cells += ["not run", "-"]
                continue
            ci = f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r.get("ci") else ""
            loss = f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}" if "first_loss" in r else "-"
            cells += [f"{r['accuracy']:.2f} {ci}", loss]
        steps = next(results["tasks"][t][method]["steps"] for t in tasks if method in results["tasks"][t])
        lines.append(f"| {method} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run, write JSON, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--budget", type=int, default=40, help="forward passes per method and task")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--n", type=int, default=50, help="test examples per task")
    ap.add_argument("--out", type=Path, default=Path("runs/experiments/zo_bench"))
    ap.add_argument("--only-finished", action="store_true",
                    help="only report (task, method) pairs already trained under --out; train nothing")
    args = ap.parse_args()
    from expertkit.progress import set_quiet

    set_quiet(True)
    started = time.perf_counter()
    results = run(args)
    results["seconds"] = time.perf_counter() - started
    _save(args.out, results)
    print(table(results))
    print(f"\n{results['seconds']:.0f} s; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
