"""ZO-Bench on SmolLM2-135M: zeroth-order LoRA fine-tuning given thousands of steps, against AdamW.

    .venv/bin/python experiments/zo_bench.py [--budget 4000] [--batch 8] [--n-val 200] [--n-test 426]
        [--methods adamw zo-sgd zo-adam forward-grad zo-sgd-block zo-sgd-sparse] [--sweep-frac 0.25]
        [--extend 2] [--keep-runs] [--out runs/experiments/zo_bench_bbc] [--executor {local,ray}] [--address HOST:6379]
    .venv/bin/python experiments/zo_bench.py --smoke      # tiny random Llama, toy choice task: checks the script

**Task.** ``bbc_topic`` (five topics) scored by label words, as MeZO scores classification: each
topic word's summed log-probability after the article's prompt, the highest wins; training puts the
loss on the answer word. LoRA rank 8 on q_proj/v_proj of the bundled SmolLM2-135M-Instruct; the
training pool is the whole train split (1,487 articles), walked in seeded epochs (seed 0, the same
data order for every method).

**Methods** (``VARIANTS``): ZO-SGD (MeZO), ZO-Adam, Forward-Grad, block-wise ZO-SGD (one estimate
per transformer layer), sparse ZO-SGD (the 25% smallest-magnitude coordinates perturbed, Sparse
MeZO's choice), ZO-SGD-Sign and ZO-SGD-Cons (opt-in), and first-order AdamW. ZO methods use ε = 1e-2
(MeZO's LoRA setting).

**Equal forward budgets.** Every method gets ``--budget`` forward units: a forward pass is 1, a
backward pass 2 (an AdamW step costs 3), a jvp 2 (its primal and tangent passes), a two-sided ZO
estimate 2 per block (ZO-SGD-Cons 5: two for the estimate, three to pick among θ, θ - step, θ + step;
block-wise ZO runs one estimate per layer, so 2 x layers per step). ``steps = budget // units``.

**Learning rate on validation only.** For each method, every lr of its grid (``GRIDS``) runs the
method's full-budget configuration, stopped after ``--sweep-frac`` of its steps (the lr is constant,
so those steps are exactly the start of the full run); that point is scored on the validation
split (``--n-val``). When the best lies at an edge of the lrs tried, the next lr beyond it on the
1-3-10 ladder is swept as well, and so on while the best stays at the edge, at most ``--extend``
(default 2) lrs per method: a best at the grid's edge is not taken for the optimum untested (ZO-Adam's
first sweep peaked at the grid's top, 1e-3). The best (accuracy, then the mean log-probability of
the right label) is resumed from its checkpoint to the full budget, so the chosen run's start is not
trained twice.
"Best ZO method", for the claim against AdamW, is the ZO method whose point chosen on validation
(below) scores highest on validation.

**Checkpoints chosen on validation.** Every run scores the LoRA start and each of its 20 checkpoints on
validation as it writes them (on a second copy of the base model; that time is not training time). A
constant lr that is best after a quarter of the run can still diverge later: ZO-SGD at 3e-4 reached a
training loss of 0.54 and 0.73 test accuracy by step 1,300 of 2,000, then diverged to 0.21 (the first
full ZO-SGD run, kept in ``superseded/``). So each method is read three ways: its final weights at the
full budget; the point (start, checkpoint or final weights) best on validation, as early stopping would
keep it; and that choice made among the points trained within the equal wall time.

**Order.** The methods run one after another (``--methods`` order, AdamW first by default): each
method's sweep, then its full run, then the next method.

**Equal wall time.** W is the training time of the first method's full run (AdamW's by default): fixed
before any other method trains, so each later run keeps, from its first step, only its point best on
validation among those trained within W (``wall.safetensors`` in its run folder; the LoRA start, which
equals the base model, until a checkpoint beats it). A run that finished within W is read as its point
chosen on validation overall. Seconds are training time only (no evaluation), so this comparison means something
only when the run had the machine to itself (not with ``--executor ray``, whose cells train side by
side); the load average is recorded at the start and end of the run and after each full run. A full run
trained on another machine than its sweep point (a session's disk lost, the run restarted from step 0
elsewhere) times its sweep point's steps again: from that step on its seconds are scaled by the ratio of the
two timings of the same work (``wall_scale``, in the result file and under the table), so a faster machine
does not buy checkpoints past W. This assumes the sweep point ran on W's machine, as every sweep point
of ``experiments/state/zo_bench_bbc`` did.

**Paired tests.** Every system scores the same ``--n-test`` test examples (all 426 by default);
exact McNemar and a paired bootstrap interval (:mod:`expertkit.tasks.paired`) for each claim in each
of the three readings (``SETTINGS``), one verdict line each. Why n = 426: with 15% of the pairs
discordant, ``mcnemar_sample_size(0.06, 0.15)`` = 325 pairs detect a 6-point difference at 80%
power, and ``mcnemar_sample_size(0.05, 0.15)`` = 469 a 5-point one: differences under about 5 points
between two ZO methods are below what this split can tell.

Resumable: every cell (a zero-shot score, a sweep point, a full run with its equal-wall score) writes
its file under ``<out>/cells`` atomically and every run checkpoints 20 times, so rerunning the same
command continues where it stopped. Unless ``--keep-runs``, ``<out>`` holds only what that needs: a sweep
point's run folder is deleted once another point of its method beats it, a full run's once it is scored
(its result file keeps every per-example score). So ``<out>`` stays a few MB (the cells, the best
sweep point's checkpoint, the run in progress) and can be committed between sessions on machines that
do not keep their disks, as ``experiments/state/zo_bench_bbc`` is. Writes ``<out>/results.json`` and
``<out>/zo_bench.png`` and prints the markdown for docs/results.md. Each checkpoint logs one line (its mean
training loss since the last one, its validation accuracy, the training seconds): the live view of a run, where
a divergence shows first. Runs whose training loss turned NaN or inf are named under the table
(``nonfinite_from`` in results.json): NaN weights tie every label, and a tie falls to the first label.

Cost on 2 cores, measured (idle machines, 8 articles per step): a ZO-SGD or ZO-Adam step 2.05-2.2 s on one
machine, 2.7 s on another, Forward-Grad 3.3 s (the first), AdamW 2.75 s (the second), sparse ZO-SGD 2.6 s
(the second) and 1.35 s on a third; so 2,000 ZO-SGD steps take 45-90 min, each method a quarter run more for
each other lr of its sweep (and each lr swept beyond its grid), plus under half a minute per validation
scoring (21 per full run, 6 per sweep point) and per test scoring: 12-15 h for the six default methods, over
several sessions.
``--executor ray`` runs the grid points of a method's sweep side by side (with ``--keep-runs``).
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

from expertkit.pipeline.sweep import Cell, add_executor_args, run_sweep, sweep_executor
from expertkit.train.validated import best_point, history, rank, train_run, wall_point, wall_scale

TASK = "bbc_topic"
#: name -> (registered optimizer, extra ZOParams)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "zo-sgd": ("zo-sgd", {}),
    "zo-adam": ("zo-adam", {}),
    "forward-grad": ("forward-grad", {}),
    "zo-sgd-block": ("zo-sgd", {"block": "layer"}),
    "zo-sgd-sparse": ("zo-sgd", {"sparsity": 0.75, "sparsity_by": "magnitude"}),
    "zo-sgd-sign": ("zo-sgd-sign", {}),
    "zo-sgd-cons": ("zo-sgd-cons", {}),
    "adamw": ("adamw", {}),
}
METHODS = ["adamw", "zo-sgd", "zo-adam", "forward-grad", "zo-sgd-block", "zo-sgd-sparse"]  # the first sets W
ZO_GRID = (1e-4, 3e-4, 1e-3)  # MeZO's LoRA lr (1e-4) and two above it: thousands of steps, not tens of thousands
GRIDS: dict[str, tuple[float, ...]] = {"zo-sgd-sign": (1e-5, 3e-5, 1e-4), "zo-adam": (1e-4, 3e-4, 1e-3),
                                       "adamw": (3e-4, 1e-3, 3e-3)}
UNITS = {"zo-sgd-cons": 5, "forward-grad": 2, "adamw": 3}  # forward units per estimate (the rest: 2)
LORA = {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "max_prompt_tokens": 128}
SNAPSHOTS = 20
ZO_EPS = 1e-2
SETTINGS = (("equal forwards, final weights", "full"), ("equal forwards, chosen on validation", "chosen"),
            ("equal wall time, chosen on validation", "wall"))  # (name, table of results) of each comparison
CLAIMS = [  # (claim, method A, method B): A beats B
    ("ZO-SGD (MeZO) beats zero-shot", "zo-sgd", "zero-shot"),
    ("ZO-Adam beats ZO-SGD", "zo-adam", "zo-sgd"),
    ("Forward-Grad beats ZO-SGD", "forward-grad", "zo-sgd"),
    ("block-wise ZO-SGD beats ZO-SGD", "zo-sgd-block", "zo-sgd"),
    ("sparse ZO-SGD beats ZO-SGD", "zo-sgd-sparse", "zo-sgd"),
    ("ZO-SGD-Sign beats ZO-SGD", "zo-sgd-sign", "zo-sgd"),
    ("ZO-SGD-Cons beats ZO-SGD", "zo-sgd-cons", "zo-sgd"),
    ("AdamW beats the best ZO method", "adamw", "best-zo"),
]


def grid(method: str) -> tuple[float, ...]:
    """The learning rates swept for ``method``."""
    return GRIDS.get(method, ZO_GRID)


def units_per_step(method: str, n_layers: int) -> int:
    """Forward units one step of ``method`` costs (block-wise: one estimate per layer)."""
    opt, extra = VARIANTS[method]
    blocks = n_layers if extra.get("block", "none") != "none" else 1
    return UNITS.get(opt, 2) * blocks


def settings(method: str, lr: float, budget: int, batch: int, n_layers: int, pool: int | None) -> dict:
    """The train_lora settings of ``method`` at ``lr`` under ``budget`` forward units."""
    opt, extra = VARIANTS[method]
    units = units_per_step(method, n_layers)
    if budget < units:
        from expertkit.errors import ConfigError

        raise ConfigError(f"--budget {budget} is below one step of {method} ({units} forward units); raise it.")
    steps = budget // units
    params = {} if opt == "adamw" else {"eps": ZO_EPS, **extra}
    return {**LORA, "steps": steps, "batch_size": batch, "lr": lr, "optimizer": opt, "optimizer_params": params,
            "save_every": max(1, steps // SNAPSHOTS), "seed": 0, "train_examples": pool}


def sweep_stop(cfg: dict, frac: float) -> int:
    """The step at which a sweep point is scored: ``frac`` of the run, on the snapshot grid."""
    every = cfg["save_every"]
    return min(cfg["steps"], max(every, every * round(frac * cfg["steps"] / every)))


def _task(name: str, smoke: bool) -> Any:
    from expertkit.tasks import get_task

    if smoke:  # a Ray worker is a fresh process: the toy task is registered there too
        from expertkit.tasks.toy import register_smoke_task

        register_smoke_task()
    return get_task(name)


def scored(result: Any, examples: list) -> dict:
    """Per-example scores, and for a choice task each example's log-probability of its right label
    normalised over its choices (the sweep's tie-breaker)."""
    import math

    gold = []
    for r, ex in zip(result.examples, examples, strict=True):
        if r.choice_logprobs and ex.choices:
            m = max(r.choice_logprobs)
            norm = m + math.log(sum(math.exp(v - m) for v in r.choice_logprobs))
            gold.append(r.choice_logprobs[list(ex.choices).index(ex.answer)] - norm)
    return {"scores": [float(r.score) for r in result.examples], "gold_lp": gold, "accuracy": float(result.accuracy)}


def evaluate_weights(loaded: Any, task: Any, cfg: dict, tensors: dict | None, split: str, n: int) -> dict:
    """Score the LoRA of ``cfg`` holding the trained tensors ``tensors`` (names as training saw them;
    None: the LoRA start, which equals the base model) on ``n`` examples of ``split``."""
    import torch

    from expertkit.errors import ConfigError
    from expertkit.tasks import evaluate
    from expertkit.train.config import LoraTrainConfig
    from expertkit.train.schemes import wrap

    config = LoraTrainConfig(**cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, give_back = wrap(loaded.model, config, loaded.path)
    try:
        if tensors is not None:
            named = dict(model.named_parameters())
            if set(tensors) != {k for k, p in named.items() if p.requires_grad}:
                raise ConfigError("a snapshot's tensors are not the trainable tensors of this LoRA configuration; "
                                  "it was made with other settings: delete its run folder and train again.")
            with torch.no_grad():
                for k, t in tensors.items():
                    named[k].copy_(t)
        result = evaluate(model, loaded.tokenizer, task, split=split, n=n, seed=0)
    finally:
        give_back()
    return scored(result, task.examples(split, n, 0))


def evaluate_adapter(loaded: Any, task: Any, adapter: Path | None, split: str, n: int) -> dict:
    """Score a finished adapter folder (None: the base model) on ``n`` examples of ``split``."""
    from expertkit.tasks import evaluate

    result = evaluate(loaded, None, task, split=split, n=n, seed=0, adapter=adapter)
    return scored(result, task.examples(split, n, 0))


def validator(loaded: Any, task: Any, cfg: dict, n: int) -> Any:
    """``tensors -> scores`` on ``n`` validation examples, for ``train_run``: on a second copy of the base
    model, loaded at the first call (during training the first copy carries the LoRA being trained)."""
    copy: list = []

    def validate(tensors: dict | None) -> dict:
        if not copy:
            from expertkit.models import load_model

            copy.append(load_model(loaded.path))
        return evaluate_weights(copy[0], task, cfg, tensors, "validation", n)

    return validate


# --------------------------------------------------------------------------------------------- cells
def zero_shot_cell(loaded: Any, task: str, n_val: int, n_test: int, result: str, smoke: bool = False,
                   match: dict | None = None) -> dict:
    """The base model on the validation and test examples."""
    from expertkit.fileio import write_atomic

    spec = _task(task, smoke)
    row = {"validation": evaluate_adapter(loaded, spec, None, "validation", n_val),
           "test": evaluate_adapter(loaded, spec, None, "test", n_test)}
    row["match"] = match  # what a rerun checks before reusing this file
    write_atomic(Path(result), json.dumps(row).encode())
    return row


def sweep_cell(loaded: Any, task: str, cfg: dict, run: str, stop: int, n_val: int, result: str,
               limit: float | None = None, smoke: bool = False, match: dict | None = None) -> dict:
    """Train ``cfg`` into ``run`` up to step ``stop`` and score that point on validation (``limit``: the
    equal-wall limit, when known, kept track of from the first step: this run may become the full one)."""
    from expertkit.fileio import write_atomic

    spec, run_dir = _task(task, smoke), Path(run)
    train_run(loaded, spec, cfg, run_dir, stop=stop, limit=limit, validate=validator(loaded, spec, cfg, n_val))
    if stop < cfg["steps"]:  # scored on validation as its checkpoint was written
        entry = next(e for e in history(run_dir) if e["step"] == stop)
        seconds, val = entry["seconds"], entry["validation"]
    else:  # the sweep point is the whole run
        seconds = json.loads((run_dir / "adapter" / "expertkit.json").read_text())["seconds"]
        val = evaluate_adapter(loaded, spec, run_dir / "adapter", "validation", n_val)
    row = {"lr": cfg["lr"], "step": stop, "seconds": seconds, "validation": val}
    row["match"] = match  # what a rerun checks before reusing this file
    write_atomic(Path(result), json.dumps(row).encode())
    print(f"sweep {run_dir.parent.name} lr {cfg['lr']:g} @ {stop}: validation {val['accuracy']:.3f}", flush=True)
    return row


def full_cell(loaded: Any, task: str, cfg: dict, run: str, n_val: int, n_test: int, result: str,
              limit: float | None = None, keep_run: bool = True, smoke: bool = False,
              match: dict | None = None, reference: list | None = None) -> dict:
    """Train (resume) ``cfg`` to its full budget in ``run``, every checkpoint scored on validation; score
    on test its final weights, the point chosen on validation among the start, the checkpoints and the
    final weights (``chosen``), and at equal wall time the point chosen on validation among those trained
    within ``limit`` seconds (``wall``; None: this run sets the limit), its seconds scaled by ``wall_scale``
    (``reference``: its sweep point's step and seconds). ``keep_run`` False: delete ``run`` once scored."""
    import shutil

    from expertkit.fileio import write_atomic

    spec, run_dir = _task(task, smoke), Path(run)
    train_run(loaded, spec, cfg, run_dir, limit=limit, validate=validator(loaded, spec, cfg, n_val),
              reference=reference)
    meta = json.loads((run_dir / "adapter" / "expertkit.json").read_text())
    row = {"lr": cfg["lr"], "steps": cfg["steps"], "seconds": meta["seconds"], "losses": meta["losses"],
           "load_average_after": list(os.getloadavg()),
           "validation": evaluate_adapter(loaded, spec, run_dir / "adapter", "validation", n_val),
           "test": evaluate_adapter(loaded, spec, run_dir / "adapter", "test", n_test)}
    points = [*history(run_dir), {"step": cfg["steps"], "seconds": meta["seconds"], "validation": row["validation"]}]
    row["curve"] = [[e["step"], e["seconds"], e["validation"]["accuracy"]] for e in points]
    tested = {cfg["steps"]: row["test"]}

    def point(entry: dict, tensors: dict | None) -> dict:
        if entry["step"] not in tested:
            tested[entry["step"]] = evaluate_weights(loaded, spec, cfg, tensors, "test", n_test)
        return {"step": entry["step"], "seconds": entry["seconds"],
                "validation": entry["validation"]["accuracy"], "test": tested[entry["step"]]}

    chosen = max(points, key=rank)
    best = best_point(run_dir) if chosen["step"] != cfg["steps"] else (cfg["steps"], 0.0, None)
    assert best[0] == chosen["step"], (best[0], chosen["step"])  # best.safetensors is the best checkpoint
    row["chosen"] = point(chosen, best[2])
    row["wall_scale"] = scale = wall_scale(reference, history(run_dir))
    if limit is None or meta["seconds"] * scale <= limit:
        row["wall"] = row["chosen"]
    else:
        step, _, _, tensors = wall_point(run_dir)
        row["wall"] = point(next(e for e in points if e["step"] == step), tensors)
    row["match"] = match  # what a rerun checks before reusing this file
    write_atomic(Path(result), json.dumps(row).encode())
    if not keep_run:  # everything later phases read is in the result file
        shutil.rmtree(run_dir)
    print(f"full {run_dir.parent.name} lr {cfg['lr']:g}: {cfg['steps']} steps in {meta['seconds']:.0f} s, "
          f"test {row['test']['accuracy']:.3f}; chosen on validation (step {row['chosen']['step']}) "
          f"{row['chosen']['test']['accuracy']:.3f}; at equal wall time (step {row['wall']['step']}) "
          f"{row['wall']['test']['accuracy']:.3f}", flush=True)
    return row


# --------------------------------------------------------------------------------------------- phases
def _cell(args: argparse.Namespace, key: str, fn: Any, match: dict, **kwargs: Any) -> Cell:
    result = args.out / "cells" / f"{key}.json"
    match = {**match, "task": args.task, "model": str(args.model)}  # a rerun on another task trains anew
    return Cell(key, fn, result, {**kwargs, "task": args.task, "result": str(result), "smoke": args.smoke,
                                  "match": match}, args.model, {"match": match})


def run_path(args: argparse.Namespace, method: str, lr: float, cfg: dict) -> Path:
    """The folder of ``method``'s run at ``lr``: ``adapter/`` (train_lora's) and ``snapshots/``. Its name
    ends in a digest of the settings, task and model, so a rerun with other settings (``--batch``,
    ``--budget``, ``--task``...) trains apart instead of resuming or scoring another run's weights."""
    import hashlib

    ident = json.dumps({"cfg": cfg, "task": args.task, "model": str(args.model)}, sort_keys=True, default=str)
    return args.out / "train" / method / f"lr-{lr:g}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def choose(rows: list[dict]) -> dict:
    """The sweep row with the best validation accuracy, then the best mean log-probability of the
    right label, then the smaller learning rate."""
    def key(r: dict) -> tuple:
        gold = r["validation"]["gold_lp"]
        return (r["validation"]["accuracy"], sum(gold) / len(gold) if gold else 0.0, -r["lr"])

    return max(rows, key=key)


def ladder(lr: float, up: bool) -> float:
    """The learning rate next to ``lr`` on the 1-3-10 ladder (1e-4, 3e-4, 1e-3, ...), above or below."""
    k = math.floor(math.log10(lr) + 1e-9)
    low = lr / 10**k < 2  # lr is 1e-k, not 3e-k
    nxt = (3 * 10**k if low else 10 ** (k + 1)) if up else (3 * 10 ** (k - 1) if low else 10**k)
    return float(f"{nxt:.0e}")


def beyond(rows: list[dict]) -> float | None:
    """The lr to sweep next for a method whose best sweep row is at an edge of the lrs tried (None if it is
    inside them)."""
    lrs = sorted(r["lr"] for r in rows)
    best = choose(rows)["lr"]
    if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
        return None
    return ladder(best, up=best == lrs[-1])


def prune(args: argparse.Namespace, method: str, rows: list[dict]) -> None:
    """Delete the run folders of ``method``'s sweep points that can no longer be chosen (all but the best
    so far: the choice is a maximum, so a point beaten now stays beaten)."""
    import shutil

    best = choose(rows)
    for r in rows:
        if r is not best:
            folder = run_path(args, method, r["lr"], _cfg(args, method, r["lr"]))
            if folder.is_dir():
                shutil.rmtree(folder)


def _cfg(args: argparse.Namespace, method: str, lr: float) -> dict:
    return settings(method, lr, args.budget, args.batch, args.n_layers, args.pool)


def sweep_method(args: argparse.Namespace, executor: Any, method: str, limit: float | None) -> list[dict]:
    """``method``'s sweep points: its grid, then beyond it while the best is at an edge (``--extend``).
    Without ``--keep-runs`` the points run one at a time, each beaten one's folder deleted at once."""
    def point(lr: float) -> Cell:
        cfg = _cfg(args, method, lr)
        stop = sweep_stop(cfg, args.sweep_frac)
        return _cell(args, f"sweep-{method}-lr{lr:g}", sweep_cell, {"cfg": cfg, "stop": stop, "n_val": args.n_val},
                     cfg=cfg, run=str(run_path(args, method, lr, cfg)), stop=stop, n_val=args.n_val, limit=limit)

    todo, rows, extra = list(grid(method)), [], args.extend
    while todo:
        now = todo if args.keep_runs else todo[:1]
        rows += run_sweep(f"zo_bench sweep {method}", [point(lr) for lr in now], executor, args.out / "logs")
        todo = todo[len(now):]
        if not args.keep_runs:
            prune(args, method, rows)
        if not todo and extra and (lr := beyond(rows)) is not None:
            todo, extra = [lr], extra - 1
    return rows


def run(args: argparse.Namespace) -> dict:
    """Zero-shot, then for each method in turn its lr sweep and its full run (the first full run sets the
    equal-wall limit), on the executor of ``args``."""
    from expertkit.pipeline.executor import ModelCache

    executor = sweep_executor(args, ModelCache(args.model), args.out)
    sweeps: dict[str, list[dict]] = {}
    full: dict[str, dict] = {}
    limit = None
    try:
        cell = _cell(args, "zero-shot", zero_shot_cell, {"n_val": args.n_val, "n_test": args.n_test},
                     n_val=args.n_val, n_test=args.n_test)
        zero = run_sweep("zo_bench zero-shot", [cell], executor, args.out / "logs")[0]
        for m in args.methods:
            sweeps[m] = sweep_method(args, executor, m, limit)
            best = choose(sweeps[m])
            lr, reference = best["lr"], [best["step"], best["seconds"]]  # not in match: a calibration
            cfg = _cfg(args, m, lr)
            cell = _cell(args, f"full-{m}", full_cell,  # "select": checkpoints chosen on validation
                         {"cfg": cfg, "limit": limit, "n_val": args.n_val, "n_test": args.n_test,
                          "select": "validation"},
                         cfg=cfg, run=str(run_path(args, m, lr, cfg)), n_val=args.n_val, n_test=args.n_test,
                         limit=limit, keep_run=args.keep_runs, reference=reference)
            full[m] = run_sweep(f"zo_bench full {m}", [cell], executor, args.out / "logs")[0]
            limit = full[m]["seconds"] if limit is None else limit
    finally:
        executor.close()
    wall = {m: {**r["wall"], "limit": limit} for m, r in full.items()}
    chosen = {m: r["chosen"] for m, r in full.items()}
    return {"zero-shot": zero, "sweep": sweeps, "full": full, "chosen": chosen, "wall": wall, "limit": limit}


# ------------------------------------------------------------------------------------------ analysis
def claims(res: dict, methods: list[str], seed: int = 0) -> dict:
    """Paired tests of every claim whose two systems ran, at equal forwards and at equal wall time."""
    from expertkit.tasks.paired import compare, verdict

    zo = [m for m in methods if m != "adamw"]
    best_zo = max(zo, key=lambda m: (res["chosen"][m]["validation"], -zo.index(m))) if zo else None
    out: dict = {"best_zo": best_zo, "tests": []}
    for claim, a, b in CLAIMS:
        b = best_zo if b == "best-zo" else b
        if b is None or a == b or any(x != "zero-shot" and x not in res["full"] for x in (a, b)):
            continue
        name = claim.replace("the best ZO method", f"the best ZO method on validation ({b})")
        for setting, table in SETTINGS:
            def test(m: str, table: str = table) -> list[float]:
                return res["zero-shot"]["test"]["scores"] if m == "zero-shot" else res[table][m]["test"]["scores"]

            r = compare(test(a), test(b), seed=seed)
            out["tests"].append({"claim": name, "setting": setting, "a": a, "b": b, **r.as_dict(),
                                 "verdict": verdict(f"{name} ({setting})", r)})
    return out


def nonfinite(res: dict) -> dict[str, int]:
    """Method -> the first step whose training loss was not finite (NaN or inf), for the runs that had one.

    A run that stays NaN ends with NaN weights: every label then scores NaN and ties (NaN included) fall to the
    first label, so its final accuracy is that label's share of the split, not a score of a model."""
    out = {}
    for m, r in res["full"].items():
        bad = [i for i, x in enumerate(r["losses"]) if x is None or not math.isfinite(x)]
        if bad:
            out[m] = bad[0] + 1
    return out


def plot(res: dict, args: argparse.Namespace, path: Path) -> None:
    """Test accuracy per method in the three readings; validation accuracy over forward units and over
    training seconds (W marked); the training loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(res["full"])
    fig, (ax, cx, wx, bx) = plt.subplots(1, 4, figsize=(22, 4.4))
    x = np.arange(len(methods))
    for j, (label, table) in enumerate(SETTINGS):
        ax.bar(x + (j - 1) * 0.27, [res[table][m]["test"]["accuracy"] for m in methods], 0.27, label=label)
    ax.axhline(res["zero-shot"]["test"]["accuracy"], color="k", ls="--", lw=1, label="zero-shot")
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylabel(f"test accuracy (n = {len(res['zero-shot']['test']['scores'])})")
    ax.set_title(f"{args.task}: {args.budget} forward units per method")
    ax.set_ylim(0, 1.3)  # room above the bars for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    for m in methods:  # validation accuracy of every checkpoint (and the start, and the final weights)
        steps, seconds, acc = zip(*res["full"][m]["curve"], strict=True)
        cx.plot(np.asarray(steps) * units_per_step(m, args.n_layers), acc, marker=".", label=m)
        wx.plot(np.asarray(seconds) * res["full"][m].get("wall_scale", 1.0), acc, marker=".", label=m)
    for axis, xlabel in ((cx, "forward units"), (wx, "training seconds (on W's machine)")):
        axis.axhline(res["zero-shot"]["validation"]["accuracy"], color="k", ls="--", lw=1)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"validation accuracy (n = {args.n_val})")
        axis.legend(fontsize=8)
    wx.axvline(res["limit"], color="k", ls=":", lw=1)
    wx.set_title(f"equal wall time: W = {res['limit']:.0f} s (dotted)")
    for m in methods:
        losses = np.asarray(res["full"][m]["losses"], dtype=float)
        w = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        bx.plot((np.arange(len(smooth)) + w) * units_per_step(m, args.n_layers), smooth, label=m)
    bx.set_xlabel("forward units")
    bx.set_ylabel("training batch loss (running mean)")
    bx.set_yscale("log")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(res: dict, args: argparse.Namespace) -> str:
    """The tables and verdict lines for docs/results.md."""
    z = res["zero-shot"]
    lines = [f"| method | lr (swept) | steps | forward units | training s | final: validation, test | "
             "chosen on validation: step, validation, test | equal wall time "
             f"({res['limit']:.4g} s, the first full run's), chosen on validation: step, validation, test |",
             "|---|---|---:|---:|---:|---|---|---|",
             f"| zero-shot | - | 0 | 0 | 0 | {z['validation']['accuracy']:.3f}, {z['test']['accuracy']:.3f} | - | - |"]

    def at(p: dict) -> str:
        return f"{p['step']}, {p['validation']:.3f}, **{p['test']['accuracy']:.3f}**"

    for m, r in res["full"].items():
        g = ", ".join(f"{row['lr']:g}" for row in res["sweep"][m])  # the grid and any lr beyond it
        lines.append(f"| {m} | {r['lr']:g} ({g}) | {r['steps']} | {r['steps'] * units_per_step(m, args.n_layers)} | "
                     f"{r['seconds']:.0f} | {r['validation']['accuracy']:.3f}, **{r['test']['accuracy']:.3f}** | "
                     f"{at(res['chosen'][m])} | {at(res['wall'][m])} |")
    width = max(len(v) for v in res["sweep"].values())
    lines += ["", f"Learning-rate sweep (validation accuracy, n = {args.n_val}, after {args.sweep_frac:g} of the "
              "steps):", "", "| method | " + " | ".join(f"lr {i + 1}" for i in range(width)) + " |",
              "|---|" + "---|" * width]
    for m, rows in res["sweep"].items():
        lines.append(f"| {m} | " + " | ".join(f"{r['lr']:g} @ step {r['step']}: {r['validation']['accuracy']:.3f}"
                                              for r in rows) + " |")
    moved = {m: r["wall_scale"] for m, r in res["full"].items() if r.get("wall_scale", 1.0) != 1.0}
    if moved:
        lines += ["", "Trained on another machine than the sweep point (and W): " + "; ".join(
            f"{m}, whose first {choose(res['sweep'][m])['step']} steps took "
            f"{choose(res['sweep'][m])['seconds']:.0f} s there and {choose(res['sweep'][m])['seconds'] / k:.0f} s "
            f"here (x {k:.3g})" for m, k in moved.items()) + ". Its equal-wall point is chosen on its seconds times "
            "that ratio; the table's training s are its own."]
    bad = nonfinite(res)
    if bad:
        lines += ["", "Training loss not finite (NaN or inf), first at step " +
                  ", ".join(f"{s}: {m}" for m, s in bad.items()) + ". A run whose loss is still NaN at its last "
                  "step ends with NaN weights: every label scores NaN, the tie falls to the first label, and the "
                  "final accuracy is that label's share of the split."]
    lines += ["", f"Best ZO method on validation: {res['claims']['best_zo']}.", ""]
    lines += [f"- {t['verdict']}" for t in res["claims"]["tests"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def _smoke_model(out: Path) -> str:
    """A saved tiny random Llama under ``out`` (and the toy task registered here); its folder."""
    from expertkit.models.tiny import saved_tiny
    from expertkit.tasks.toy import register_smoke_task

    register_smoke_task()
    return saved_tiny("llama", out / "tiny-llama")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default=TASK, help="a choice task (scored by label words)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=list(VARIANTS))
    ap.add_argument("--budget", type=int, default=4000, help="forward units per method (a backward pass = 2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pool", type=int, default=None,
                    help="training examples drawn, the same for every method (default: bbc_topic's whole train "
                         "split, else the longest run's steps x batch)")
    ap.add_argument("--n-val", type=int, default=200, help="validation examples (the lr choice)")
    ap.add_argument("--n-test", type=int, default=426, help="test examples (the same for every method)")
    ap.add_argument("--sweep-frac", type=float, default=0.25, help="share of the steps at which lrs are compared")
    ap.add_argument("--extend", type=int, default=2,
                    help="lrs swept beyond a method's grid at most, while its best is at the edge (0: the grid only)")
    ap.add_argument("--keep-runs", action="store_true",
                    help="keep every run folder (default: delete beaten sweep points and scored full runs)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the paired bootstrap")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: runs/experiments/zo_bench_bbc (smoke: a temp folder)")
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, toy task, tiny budget: checks the script")
    add_executor_args(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.task, args.budget, args.batch, args.n_val, args.n_test = "lo-hi", 24, 4, 6, 8
        args.out = args.out or Path(tempfile.mkdtemp(prefix="zo-bench-smoke-"))
    args.out = (args.out or Path("runs/experiments/zo_bench_bbc")).absolute()  # absolute: Ray workers read it
    if not 0 < args.sweep_frac <= 1:
        ap.error(f"--sweep-frac must be in (0, 1], got {args.sweep_frac}.")
    if args.extend < 0:
        ap.error(f"--extend must be 0 or more, got {args.extend}.")
    if min(args.budget, args.batch, args.n_val, args.n_test, 1 if args.pool is None else args.pool) < 1:
        ap.error("--budget, --batch, --pool, --n-val and --n-test must each be at least 1.")
    if len(set(args.methods)) != len(args.methods):
        ap.error("--methods names a method twice.")
    return args


def _prepare(args: argparse.Namespace) -> None:
    """The model source, its layer count and the training pool; a clear error for a task that cannot serve."""
    from transformers import AutoConfig

    from expertkit.errors import ConfigError
    from expertkit.pipeline.executor import model_source

    from expertkit.models.loader import resolve

    args.out.mkdir(parents=True, exist_ok=True)
    spec = _task(args.task, args.smoke or args.task == "lo-hi")
    if spec.kind != "choice":
        raise ConfigError(f"task '{args.task}' is a {spec.kind} task; this experiment scores label words, "
                          "so it needs a choice task (e.g. bbc_topic).")
    args.model = model_source(_smoke_model(args.out) if args.smoke else "smollm2-135m")
    args.n_layers = int(AutoConfig.from_pretrained(str(resolve(args.model)[1])).num_hidden_layers)
    if args.pool is None and args.task == "bbc_topic":
        from expertkit.tasks.bbc import split_sizes

        args.pool = split_sizes()["train"]
    elif args.pool is None:  # the same pool and data order for every method: the longest run's examples
        args.pool = max(settings(m, 1.0, args.budget, args.batch, args.n_layers, None)["steps"]
                        for m in args.methods) * args.batch


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run every phase, write results.json and the plot, print the markdown; the results."""
    args = _args(argv)
    from expertkit.progress import set_quiet

    set_quiet(True)
    _prepare(args)
    started, load_before = time.perf_counter(), os.getloadavg()
    res = run(args)
    res["claims"] = claims(res, args.methods, args.seed)
    res["nonfinite_from"] = nonfinite(res)
    res["settings"] = {"task": args.task, "budget": args.budget, "batch": args.batch, "pool": args.pool,
                       "n_val": args.n_val, "n_test": args.n_test, "sweep_frac": args.sweep_frac,
                       "n_layers": args.n_layers, "units": {m: units_per_step(m, args.n_layers) for m in args.methods},
                       "grids": {m: list(grid(m)) for m in args.methods}, "smoke": args.smoke}
    res["seconds"] = time.perf_counter() - started
    res["load_average"] = {"start": load_before, "end": os.getloadavg()}
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    plot(res, args, args.out / "zo_bench.png")
    print(f"\n## ZO-Bench on {args.task} (command: experiments/zo_bench.py{' --smoke' if args.smoke else ''})\n")
    print(markdown(res, args))
    print(f"\n{res['seconds']:.0f} s; load average {load_before[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
          f"end; results in {args.out / 'results.json'}")
    return res


if __name__ == "__main__":
    from expertkit.errors import ExpertkitError

    try:
        main()
    except ExpertkitError as exc:  # bad input: one line, no traceback
        raise SystemExit(f"zo_bench: {exc}") from None
