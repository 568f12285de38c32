"""The quickstart's train_experts and evaluate stages in this process against Ray on the same machine.

    flock /tmp/expertkit-bench.lock .venv/bin/python bench/run_executor.py --steps 30 --n 100
    .venv/bin/python bench/run_executor.py --tiny       # smoke: a tiny random Llama, toy tasks, seconds

Both executors run the same two stages (``train_experts`` on the quickstart's four tasks with its
training settings, then ``evaluate`` of the base and the four experts on the four tasks) from a fresh
run folder and a fresh evaluation cache, on the bundled SmolLM2-135M-Instruct (converted once into
the cache before timing; both runs read that folder). ``local`` is the default executor (one process,
torch's default threads); ``ray`` starts a local Ray with ``--num-cpus`` CPUs (its start-up is timed
apart) and runs each job as a task asking for one CPU. The script prints each stage's seconds, the
ratio ray/local, checks that the two runs gave the same adapters and the same accuracy matrix, and
prints the scaling model below for N workers with the per-job figures it measured.

Scaling model (stated, not measured across machines): a stage of J independent jobs, each taking
``t`` seconds of compute on its own cores, and ``o`` seconds of per-job overhead on Ray (scheduling,
the worker importing expertkit and loading the base model when it has not yet, sending the job,
reading the result), runs on N single-job workers in ``T(N) = ceil(J / N) * (t + o)``, plus the Ray
start-up once per run. Assumptions: each worker has its own cores (no sharing, unlike this 2-core
measurement, where ``t`` on Ray includes the contention of parallel jobs), the shared file system
is not the bottleneck (an adapter is ~1 MB; an evaluation cell writes a few kB), jobs of a stage are
of similar length, and the driver's own work between stages (merge, heatmap) is left out. ``t`` is
estimated as the local stage time over J, ``o`` as the Ray stage time over ceil(J / W) minus ``t``,
where W is the number of jobs this machine ran at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

QUICKSTART_TASKS = ["family_relation", "reverse_words", "leg_count", "bbc_topic"]
QUICKSTART_TRAIN = {"batch_size": 8, "lr": 0.003, "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def _tensors(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """``(metadata, {name: raw bytes})`` of a safetensors file: what "the same adapter" means here.
    Not the file's bytes: safetensors writes its JSON header in a per-process order."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                         for k in sorted(f.keys())}


def run_once(kind: str, model: str, tasks: list[str], train: dict[str, Any], n: int, batch_size: int,
             root: Path) -> dict[str, Any]:
    """Run the two stages on one executor from a fresh run folder and cache; return their seconds and outputs."""
    from expertkit.pipeline import parse_run_config, run_pipeline

    os.environ["EXPERTKIT_CACHE"] = str(root / f"cache-{kind}")
    config = {"name": kind, "model": model, "output_dir": str(root / "runs"), "seed": 0,
              "executor": {"kind": kind, "num_cpus": 1},
              "stages": [{"kind": "train_experts", "tasks": tasks, "train": train},
                         {"kind": "evaluate", "n": n, "batch_size": batch_size}]}
    t0 = time.perf_counter()
    run_dir = run_pipeline(parse_run_config(config))
    total = time.perf_counter() - t0
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    adapters = {t: _tensors(run_dir / "experts" / t / "adapter_model.safetensors") for t in tasks}
    return {"train": stages["train_experts"]["seconds"], "evaluate": stages["evaluate"]["seconds"],
            "total": total, "matrix": stages["evaluate"]["result"]["matrix"], "adapters": adapters}


def scaling(stage: str, jobs: int, local_s: float, ray_s: float, parallel: int, workers: list[int]) -> str:
    """One line of the scaling model for a stage: predicted seconds on N workers."""
    t = local_s / jobs
    o = max(0.0, ray_s / math.ceil(jobs / parallel) - t)
    preds = ", ".join(f"N={w}: {math.ceil(jobs / w) * (t + o):.1f} s" for w in workers)
    return f"  {stage:<13} J={jobs:<3} t={t:.2f} s/job  o={o:.2f} s/job  ->  {preds}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run both executors, print the table, the check and the scaling model."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps per expert (quickstart: 30)")
    ap.add_argument("--n", type=int, default=100, help="evaluation examples per task (quickstart: 100)")
    ap.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (quickstart: 16)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and two toy tasks (smoke test)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import ray

    root = Path(tempfile.mkdtemp(prefix="bench-executor-"))
    if args.tiny:
        from expertkit.models.tiny import save_tiny
        from expertkit.tasks.base import TASKS
        from expertkit.tasks.toy import copy_task, lohi_task

        model = str(save_tiny("llama", root / "tiny", 0))
        tasks = []
        for task in (lohi_task(), copy_task()):
            TASKS.add(task.name, task, summary="toy")
            tasks.append(task.name)
        train = {"steps": args.steps, "batch_size": 8, "lr": 0.01, "rank": 4, "save_every": 0,
                 "target_modules": ["q_proj", "v_proj"]}
    else:
        from expertkit.models.loader import resolve

        model = str(resolve("smollm2-135m")[1])  # converted once into the user's cache, outside the timing
        tasks, train = QUICKSTART_TASKS, {**QUICKSTART_TRAIN, "steps": args.steps}
    load = os.getloadavg()
    local = run_once("local", model, tasks, train, args.n, args.batch_size, root)
    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    start = time.perf_counter() - t0
    try:
        remote = run_once("ray", model, tasks, train, args.n, args.batch_size, root)
    finally:
        ray.shutdown()
    load_after = os.getloadavg()
    same = local["adapters"] == remote["adapters"] and local["matrix"] == remote["matrix"]
    cells = (len(tasks) + 1) * len(tasks)
    print(f"model {'tiny llama' if args.tiny else 'smollm2-135m'}, {len(tasks)} tasks, {args.steps} steps, "
          f"n={args.n}; Ray with {args.num_cpus} CPUs (1 per job)")
    print(f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"{'stage':<14}{'local s':>10}{'ray s':>10}{'ray/local':>11}")
    for stage in ("train", "evaluate"):
        print(f"{stage:<14}{local[stage]:>10.1f}{remote[stage]:>10.1f}{remote[stage] / local[stage]:>11.2f}")
    both_l, both_r = local["train"] + local["evaluate"], remote["train"] + remote["evaluate"]
    print(f"{'both':<14}{both_l:>10.1f}{both_r:>10.1f}{both_r / both_l:>11.2f}")
    print(f"Ray start-up (apart): {start:.1f} s; same adapters and accuracy matrix: {same}")
    print("scaling model T(N) = ceil(J/N) * (t + o), plus Ray start-up (see the docstring for the assumptions):")
    workers = sorted({1, 2, 4, 8, cells})
    print(scaling("train_experts", len(tasks), local["train"], remote["train"], args.num_cpus, workers))
    print(scaling("evaluate", cells, local["evaluate"], remote["evaluate"], args.num_cpus, workers))
    figures = {"local": {k: local[k] for k in ("train", "evaluate", "total")},
               "ray": {k: remote[k] for k in ("train", "evaluate", "total")}, "ray_start": start,
               "same": same, "load_before": load, "load_after": load_after}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
