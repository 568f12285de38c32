"""ZO-Bench at small scale: zeroth-order LoRA fine-tuning vs first-order Adam vs zero-shot.

    .venv/bin/python experiments/zo_bench.py [--tasks family_relation leap_year] [--budget 40]
        [--batch 4] [--n 50] [--methods ...] [--out runs/experiments/zo_bench]
        [--executor {local,ray}] [--address HOST:6379] [--smoke]

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
Writes ``<out>/results.json``, ``<out>/cells/<task>-<method>.json`` (one per cell: an interrupted
run resumes) and prints the markdown table for docs/results.md.

Every (task, method) pair and every task's zero-shot score is an independent cell: ``--executor
ray`` runs them as Ray tasks (:mod:`expertkit.pipeline.sweep`; per-cell logs in ``<out>/logs``); the
default runs them one after the other in this process (per task: zero-shot, then the methods in
order). ``--smoke`` runs the script on a tiny random Llama and a toy task in seconds (a check of
the script, not a result).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from expertkit.pipeline.sweep import Cell, add_executor_args, run_sweep, sweep_executor

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


def _task(name: str, smoke: bool) -> Any:
    from expertkit.tasks import get_task

    if smoke:  # a Ray worker is a fresh process: the toy task is registered there too
        from expertkit.tasks.toy import register_smoke_task

        register_smoke_task()
    return get_task(name)


def zero_shot_cell(base: Any, name: str, n: int, result: Path, smoke: bool = False) -> dict:
    """The base model zero-shot on ``n`` test examples of task ``name``; written to ``result``."""
    from expertkit.fileio import write_atomic
    from expertkit.tasks import evaluate

    zero = evaluate(base, None, _task(name, smoke), split="test", n=n, seed=0)
    row = {"accuracy": zero.accuracy, "ci": [zero.ci_low, zero.ci_high], "steps": 0, "forwards": 0, "seconds": 0.0,
           "n": n}
    write_atomic(result, json.dumps(row, indent=1).encode())
    return row


def method_cell(base: Any, name: str, method: str, cfg: dict, out: Path, result: Path, smoke: bool = False) -> dict:
    """Train (or reuse) ``method``'s LoRA on task ``name`` into ``out`` with ``cfg``; its row, written to ``result``."""
    from expertkit.fileio import write_atomic
    from expertkit.train import train_lora

    started = time.perf_counter()
    res = train_lora(base, _task(name, smoke), out, **cfg)
    m = res.metrics or {}
    row = {
        "accuracy": m.get("accuracy"), "ci": m.get("ci"), "steps": cfg["steps"], "lr": cfg["lr"],
        "forwards": cfg["steps"] * FORWARDS_PER_STEP.get(method, 2), "first_loss": res.losses[0],
        "final_loss": res.train_loss, "seconds": res.seconds, "wall": time.perf_counter() - started,
    }
    print(f"{name} {method}: acc {m.get('accuracy')} loss {res.losses[0]:.3f} -> {res.train_loss:.3f} "
          f"({res.seconds:.0f} s)", flush=True)
    write_atomic(result, json.dumps({**row, "settings": cfg}, indent=1).encode())
    return row


def sweep(args: argparse.Namespace, model: str) -> list[Cell]:
    """The cells in run order: per task, zero-shot, then every method (``--only-finished``: trained ones)."""
    cells = []
    for name in args.tasks:
        cells.append(Cell(f"{name}-zero-shot", zero_shot_cell, args.out / "cells" / f"{name}-zero-shot.json",
                          {"name": name, "n": args.n, "result": args.out / "cells" / f"{name}-zero-shot.json",
                           "smoke": args.smoke}, model, {"n": args.n}))
        for method in args.methods:
            if args.only_finished and not (args.out / name / method / "expertkit.json").is_file():
                continue  # not trained (an interrupted run): left out of the table
            cfg = settings(method, args.budget, args.batch, args.n)
            result = args.out / "cells" / f"{name}-{method}.json"
            cells.append(Cell(f"{name}-{method}", method_cell, result,
                              {"name": name, "method": method, "cfg": cfg, "out": args.out / name / method,
                               "result": result, "smoke": args.smoke}, model, {"settings": cfg}))
    return cells


def run(args: argparse.Namespace) -> dict:
    """Train and evaluate every (task, method) on the executor of ``args``; return the results."""
    from expertkit.pipeline.executor import ModelCache, model_source

    args.out.mkdir(parents=True, exist_ok=True)
    model = model_source(_smoke_model(args.out) if args.smoke else "smollm2-135m")
    cells = sweep(args, model)
    executor = sweep_executor(args, ModelCache(model), args.out)  # local: loaded once, by the first cell that runs
    try:
        rows = run_sweep("zo_bench", cells, executor, args.out / "logs")
    finally:
        executor.close()
    results: dict = {"budget": args.budget, "batch": args.batch, "n": args.n, "tasks": {}}
    for cell, row in zip(cells, rows, strict=True):
        name, label = cell.kwargs["name"], cell.kwargs.get("method", "zero-shot")
        results["tasks"].setdefault(name, {})[label] = {k: v for k, v in row.items() if k not in ("n", "settings")}
    return results


def _smoke_model(out: Path) -> str:
    """A saved tiny random Llama under ``out`` (and the toy task registered here); its folder."""
    from expertkit.models.tiny import save_tiny
    from expertkit.tasks.toy import register_smoke_task

    register_smoke_task()
    folder = out / "tiny-llama"
    return str(folder if (folder / "config.json").is_file() else save_tiny("llama", folder))


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


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--budget", type=int, default=40, help="forward passes per method and task")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--n", type=int, default=50, help="test examples per task")
    ap.add_argument("--out", type=Path, default=None, help="default: runs/experiments/zo_bench (smoke: a temp folder)")
    ap.add_argument("--only-finished", action="store_true",
                    help="only report (task, method) pairs already trained under --out; train nothing")
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, toy task, tiny budget: checks the script")
    add_executor_args(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.tasks, args.budget, args.batch, args.n = ["lo-hi"], 4, 4, 6
        args.methods = [m for m in args.methods if m in ("zo-sgd", "adamw")] or args.methods
        args.out = args.out or Path(tempfile.mkdtemp(prefix="zo-bench-smoke-"))
    args.out = args.out or Path("runs/experiments/zo_bench")
    if args.executor == "ray":
        args.out = args.out.absolute()  # the workers' working folder may differ from this one
    return args


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run, write JSON, print the table; return the results."""
    args = _args(argv)
    from expertkit.progress import set_quiet

    set_quiet(True)
    started = time.perf_counter()
    results = run(args)
    results["seconds"] = time.perf_counter() - started
    _save(args.out, results)
    print(table(results))
    print(f"\n{results['seconds']:.0f} s; results in {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
