"""Model-GLUE at small scale: plan and build a heterogeneous zoo of SmolLM2-135M experts.

The zoo (6 experts, two families of mergeable models):

* family A: four LoRA experts of the bundled SmolLM2-135M-Instruct (family_relation,
  reverse_words, leg_count, bbc_topic; rank 8 on q_proj/v_proj, 60 steps: the quickstart's
  experts, reused from ``runs/quickstart/experts`` when they were made from this base, else
  trained the same way);
* family B: an *evolved* base (``expertkit.port.evolve``: 8 steps of continued pretraining on the
  BBC train articles) and two LoRA experts trained on it, rank 8 on every projection:
  family_relation (24 steps of 8) and bbc_topic (8 steps of 4): another team's experts, made from
  version 2 of the base. (Small because CPU time was scarce when this was run; raise
  ``--b-steps`` / ``--b-batch`` on a quieter machine.)

The planner (``expertkit.merge.zoo.plan_zoo``) clusters the zoo (similarity of the embedding
group, which no LoRA expert changes, so it tells the base versions apart), chooses a merge per
cluster on the validation split under an evaluation budget, and ``build_plan`` writes the cluster
representatives and the FFN-level (Mixtral) mixture. Compared on the test split, averaged over
the zoo's tasks: the best single zoo model, the uniform merge of all six (linear), the
planner's merge (best cluster representative), the FFN-level mixture, the model-level mixture
(a MiniLM sequence router over the representatives) and, as a reference, the per-task oracle.

    .venv/bin/python experiments/model_glue.py --no-bases   # ~10 min of CPU (2 cores)
    .venv/bin/python experiments/model_glue.py --no-bases --executor ray [--address HOST:6379]

Writes ``runs/model_glue/results.json`` and prints a markdown table. Re-running reuses the trained
experts, the evolved base, the plan, the build and cached evaluations.

The planner scores its merge candidates as jobs on the executor of ``--executor``
(:mod:`expertkit.pipeline.zoo_jobs`, as ``expertkit zoo plan --executor``): by default one after the
other in this process, with ``ray`` each batch of independent candidates (the members alone, the grid,
a CMA-ES generation) side by side as Ray tasks. The candidates' files and the jobs' logs go to
``<out>/plan-jobs``; their scores are cached in ``<out>/eval-cache``. Either way the plan is the one
the in-process planner makes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from expertkit.pipeline.executor import ModelCache
from expertkit.pipeline.sweep import add_executor_args, sweep_executor

A_TASKS = ["family_relation", "reverse_words", "leg_count", "bbc_topic"]
A_TRAIN = {"steps": 60, "batch_size": 8, "lr": 2e-3, "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def family_a(base, out: Path, quickstart: Path) -> list[Path]:
    """The quickstart experts when they match this base, else trained into ``out``."""
    from expertkit.train import train_lora

    paths = []
    for task in A_TASKS:
        qs = quickstart / task
        try:
            meta = json.loads((qs / "expertkit.json").read_text())
            if meta.get("base_fingerprint") == base.fingerprint and meta.get("task") == task:
                paths.append(qs)
                continue
        except (OSError, ValueError):
            pass
        train_lora(base, task, out / "experts_a" / task, seed=0, **A_TRAIN)
        paths.append(out / "experts_a" / task)
    return paths


def family_b(base, out: Path, tasks: list[str], evolve_steps: int, steps: list[int],
             batch: list[int]) -> tuple[Path, list[Path]]:
    """The evolved base and its LoRA experts."""
    from expertkit.models import load_model
    from expertkit.port.evolve import evolve
    from expertkit.train import train_lora

    folder = out / "base_v2"
    if not (folder / "config.json").exists():
        evolve(base, folder, corpus="bbc", steps=evolve_steps, warmup=2, seed=0)
    v2 = load_model(folder)
    paths = []
    for task, n_steps, n_batch in zip(tasks, steps, batch, strict=True):
        train_lora(v2, task, out / "experts_b" / task, steps=n_steps, batch_size=n_batch, lr=2e-3, rank=8, alpha=16,
                   seed=0)
        paths.append(out / "experts_b" / task)
    return folder, paths


def uniform_merge(members: list[Path], out: Path) -> Path:
    """Linear (uniform) merge of every zoo member, streamed tensor by tensor."""
    from expertkit.merge import merge_state_dicts
    from expertkit.merge.zoo import MemberWeights, discover_zoo
    from expertkit.weights import ShardedWriter

    if (out / "config.json").exists():
        return out
    readers = [MemberWeights(m) for m in discover_zoo(members)]
    try:
        first = readers[0]
        with ShardedWriter(out, template=first.member.weights_base, layout=first.ckpt.infos()) as writer:
            for name in first.names():
                t = merge_state_dicts("linear", [{name: r.read(name)} for r in readers])[name]
                writer.add(name, t.to(first.dtype(name)))
    finally:
        for r in readers:
            r.close()
    return out


def make_plan(args: argparse.Namespace, members: list[Path], tasks: list[str]) -> Any:
    """The zoo plan (:func:`~expertkit.merge.zoo.plan_zoo`), its candidates scored as jobs on the executor of
    ``args`` (work folder ``<out>/plan-jobs``, scores cached in ``<out>/eval-cache``)."""
    from expertkit.merge.zoo import plan_zoo
    from expertkit.pipeline.zoo_jobs import job_evaluator_factory

    work = (args.out / "plan-jobs").absolute()
    work.mkdir(parents=True, exist_ok=True)
    executor = sweep_executor(args, ModelCache(), work)
    try:
        factory = job_evaluator_factory(executor, work, split="validation", n=args.val_n, seed=0,
                                        cache_dir=args.out / "eval-cache")
        return plan_zoo(members, tasks, group=args.group, n=args.val_n, budget=args.budget, mixture="ffn",
                        search=args.search, seed=0, evaluator_factory=factory)
    finally:
        executor.close()


def scores(model, tasks, n, cache, adapter=None, label="") -> dict[str, float]:
    """Test accuracy per task (printed as soon as known)."""
    from expertkit.tasks import evaluate

    r = {t: evaluate(model, None, t, split="test", n=n, seed=0, adapter=adapter, cache_dir=cache).accuracy
         for t in tasks}
    print(f"ROW {label}: {json.dumps(r)}", flush=True)
    return r


def main() -> None:  # noqa: PLR0915 - one experiment, step by step
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/model_glue"))
    parser.add_argument("--quickstart", type=Path, default=Path("runs/quickstart/experts"))
    parser.add_argument("--b-tasks", default="family_relation,bbc_topic")
    parser.add_argument("--evolve-steps", type=int, default=8)
    parser.add_argument("--b-steps", default="24,8", help="LoRA steps per B task")
    parser.add_argument("--b-batch", default="8,4", help="LoRA batch size per B task")
    parser.add_argument("--no-bases", action="store_true", help="skip evaluating the two bases")
    parser.add_argument("--n", type=int, default=30, help="test examples per task")
    parser.add_argument("--val-n", type=int, default=10, help="validation examples per task for the planner")
    parser.add_argument("--budget", type=int, default=7, help="evaluations per cluster")
    parser.add_argument("--group", default="embedding", help="tensor group the clustering uses")
    parser.add_argument("--search", default="grid", choices=["grid", "cmaes"], help="coefficient search per cluster")
    add_executor_args(parser)
    args = parser.parse_args()
    if args.executor == "ray":
        args.out = args.out.absolute()  # the workers' working folder may differ from this one

    from expertkit.merge.mixture import SequenceRouter, evaluate_routed, minilm_embed
    from expertkit.merge.zoo import build_plan, load_plan, save_plan
    from expertkit.models import load_model
    from expertkit.progress import note
    from expertkit.tasks import get_task

    started = time.perf_counter()
    out, cache = args.out, args.out / "eval-cache"
    b_tasks = args.b_tasks.split(",")
    tasks = A_TASKS + [t for t in b_tasks if t not in A_TASKS]
    base = load_model("smollm2-135m")
    a_paths = family_a(base, out, args.quickstart)
    v2_folder, b_paths = family_b(base, out, b_tasks, args.evolve_steps,
                                  [int(x) for x in args.b_steps.split(",")], [int(x) for x in args.b_batch.split(",")])
    members = a_paths + b_paths
    t_zoo = time.perf_counter()

    plan_path = out / "plan.yaml"
    if plan_path.exists():
        plan = load_plan(plan_path)
    else:
        plan = make_plan(args, members, tasks)
        save_plan(plan, plan_path)
    t_plan = time.perf_counter()
    print(f"PLAN {[(c.name, c.members, c.method, c.merged, c.params, c.score) for c in plan.clusters]}", flush=True)
    built = out / "built"
    if not (built / "build.json").exists():
        build_plan(plan, built)
    uniform = uniform_merge(members, out / "uniform")
    print("BUILT", flush=True)
    t_build = time.perf_counter()

    rows: dict[str, dict[str, float]] = {}
    def row(label: str, model, adapter=None) -> None:
        rows[label] = scores(model, tasks, args.n, cache, adapter=adapter, label=label)

    if not args.no_bases:
        row("base (SmolLM2-135M)", base)
    for p in a_paths:
        row(f"A: {p.name}", base, p)
    del base
    v2 = load_model(v2_folder)
    if not args.no_bases:
        row("base v2 (evolved)", v2)
    for p in b_paths:
        row(f"B: {p.name}", v2, p)
    del v2
    zoo_rows = [k for k in rows if k.startswith(("A:", "B:"))]
    reps = {}
    for c in plan.clusters:
        label = f"cluster {c.name}: {c.method}({', '.join(c.merged)})"
        row(label, load_model(built / "clusters" / c.name))
        reps[c.name] = label
    mixed = plan.mixed_clusters()
    prompts = [[get_task(t).format_prompt(e) for t in (c.tasks or tasks)
                for e in get_task(t).examples("train", 16, 0)] for c in mixed]
    embed = minilm_embed()
    router = SequenceRouter.fit([c.name for c in mixed], prompts, embed)
    rep_models = [load_model(built / "clusters" / c.name) for c in mixed]
    routed = {t: evaluate_routed(rep_models, router, t, embed, split="test", n=args.n) for t in tasks}
    rows["model-level mixture (MiniLM router)"] = {t: r["accuracy"] for t, r in routed.items()}
    print(f"ROW model-level mixture: {json.dumps(rows['model-level mixture (MiniLM router)'])}", flush=True)
    del rep_models
    if (built / "mixture").exists():
        row("FFN mixture (Mixtral, top-1)", load_model(built / "mixture"))
    row("uniform merge (linear, all 6)", load_model(uniform))
    t_eval = time.perf_counter()

    def avg(r: dict[str, float]) -> float:
        return sum(r.values()) / len(r)

    best_single = max(zoo_rows, key=lambda k: avg(rows[k]))
    best_rep = max(reps.values(), key=lambda k: avg(rows[k]))
    oracle = {t: max(rows[k][t] for k in zoo_rows) for t in tasks}
    summary = {
        "best single model": (best_single, avg(rows[best_single])),
        "uniform merge": ("uniform merge (linear, all 6)", avg(rows["uniform merge (linear, all 6)"])),
        "planner's merge (best cluster)": (best_rep, avg(rows[best_rep])),
        "FFN mixture": ("FFN mixture (Mixtral, top-1)", avg(rows.get("FFN mixture (Mixtral, top-1)", {"-": 0.0}))),
        "model-level mixture": ("model-level mixture (MiniLM router)", avg(rows["model-level mixture (MiniLM router)"])),
        "oracle (best zoo model per task)": ("oracle", avg(oracle)),
    }
    result = {
        "args": {k: str(v) for k, v in vars(args).items()}, "tasks": tasks, "rows": rows, "oracle": oracle,
        "summary": {k: {"model": m, "average": a} for k, (m, a) in summary.items()},
        "clusters": [{"name": c.name, "members": c.members, "method": c.method, "merged": c.merged,
                      "params": c.params, "validation": c.score} for c in plan.clusters],
        "routed": {t: r["routed"] for t, r in routed.items()},
        "similarity": plan.similarity.model_dump(),
        "seconds": {"zoo": round(t_zoo - started), "plan": round(t_plan - t_zoo), "build": round(t_build - t_plan),
                    "evaluate": round(t_eval - t_build), "total": round(t_eval - started)},
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    note(f"wrote {out / 'results.json'}")
    print("| model | " + " | ".join(tasks) + " | average |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for k, r in [*rows.items(), ("oracle (best zoo model per task)", oracle)]:
        print(f"| {k} | " + " | ".join(f"{r[t]:.2f}" for t in tasks) + f" | {avg(r):.3f} |")
    print()
    best = summary["best single model"][1]
    print("| system | average | vs best single |")
    print("|---|---:|---:|")
    for k, (_, a) in summary.items():
        print(f"| {k} | {a:.3f} | {100 * (a - best):+.1f} pts |")


if __name__ == "__main__":
    main()
