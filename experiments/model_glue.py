"""Model-GLUE at small scale: plan, merge and mix a two-family zoo of LoRA experts, against the best single model.

    .venv/bin/python experiments/model_glue.py [--n 300] [--val-n 100] [--out runs/experiments/model_glue]
    .venv/bin/python experiments/model_glue.py --executor ray [--address HOST:6379] [--cpus-per-cell 1]
    .venv/bin/python experiments/model_glue.py --smoke     # a tiny random llama, tiny n: checks the script

1. The zoo: 8 LoRA experts in 2 families (two bases) over the 5 tasks of ``--a-tasks``.
   Family A: the GLIDER library's experts of ``--a-tasks`` on the bundled SmolLM2-135M-Instruct
   (``expertkit.route.build_library(base, LibraryConfig())``: found in the cache, else trained, about 1 h,
   resumable). Family B: LoRA experts of ``--b-tasks`` on an *evolved* base (PortLLM's level ``--b-level``:
   ``expertkit.port.evolve`` on the BBC articles, 60 steps at lr 2.5e-4, median drift about 0.96%), fine-tuned
   as experiments/portllm.py does (q/v, rank 8, 60 steps of 8, lr 2e-3): read from ``--b-from`` (default
   ``runs/experiments/portllm2``) when there and made with these settings on that base, else built under
   ``<out>/family-b`` (evolve, then ``train_lora``, which resumes and reuses a finished adapter).
2. The planner (``plan_zoo``: clusters by the similarity of ``--group``, a merge per cluster chosen on
   the *validation* split, ``--val-n`` examples per task, under ``--budget`` evaluations per cluster,
   ``--search`` grid or CMA-ES; its candidates are jobs on ``--executor``), then ``build_plan``: the cluster
   representatives and the FFN-level (Mixtral, top-1) mixture of them. Besides: the uniform (linear) merge
   of all members, and a model-level mixture (a MiniLM ``SequenceRouter`` over the representatives, fitted
   on 16 training prompts per task, scored by ``evaluate_routed``).
3. Every system scores the same ``--n`` test examples of each task: each member alone on its own base,
   the two bases zero-shot (references), each representative, the uniform merge, both mixtures. The members
   and the representatives also score the same ``--val-n`` validation examples of each task, and every choice
   is made there, never on test: the *best single model* (highest mean validation accuracy over the tasks,
   first in zoo order on ties), the planner's *best cluster*, and the *oracle* (per task the member best on
   validation, scored on test: a reference, not a deployable system).
4. Each system against the best single model by a paired test over all test examples of all tasks, the
   per-example scores concatenated in task order (exact McNemar, paired bootstrap interval of the
   difference; ``expertkit.tasks.paired``), and per task; one verdict per claim.

Why n = 300 test and 100 validation examples per task: pooled over 5 tasks, 1,500 test pairs detect a
3-point difference when up to 17% of the pairs are discordant (``mcnemar_sample_size(0.03, 0.17)`` = 1,481)
and a 4-point one at 20% (979); per task, 300 pairs detect 5 points at 10% discordant (312) and 8 points at
20% (243). Validation only chooses: its 500 pooled examples tell apart two members 5 points apart at 15%
discordant (469); closer members are near-ties, and choosing among them on test would pick the one luckiest on
the very examples of the comparison (a winner's curse that favours the best single model against every merge).

Checkpoints: every (system, split, task) cell's per-example scores go to
``<out>/cells/<split>/<system>/<task>.json`` (written atomically, with the cell's recipe), so a rerun of the
same command skips finished cells and evaluates only what is missing; the plan (``plan.yaml``), the build
(``built/``) and the uniform merge are reused while their recipe (members' contents included) is unchanged;
the router is refitted (seconds) and its cells reused while its file's digest is unchanged. With ``--executor ray``
the cells run as Ray tasks (:mod:`expertkit.pipeline.sweep`, logs in ``<out>/logs``), as do the planner's
candidates (``<out>/plan-jobs``, scores cached in ``<out>/eval-cache``); locally they run one after the
other in this process and give the same scores.

Writes ``<out>/results.json`` and ``<out>/model_glue.png`` and prints the markdown for docs/results.md.

Cost: about 37,000 example evaluations (members 16,000; the planner at most 9,600 at budget 12 with clusters of
5 and 3; bases 3,000; representatives 4,000; uniform merge and the two mixtures 4,500). Timed on the bundled
model with one thread while another experiment kept both cores busy (20 examples per task): 0.31-0.45 s per
example for a plain model, 0.41-0.63 s with a family-A adapter, so about 4 h at those rates. Measured end to
end on 2 quiet cores (session 23, the library cached): about 50 min (family B 10 min, plan and build 11 min,
evaluation 29 min; docs/results.md). The zoo is reused on this machine; a fresh one first
builds the library (about 1 h) and family B (the evolved base and 3 experts, about 20 min).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from expertkit.pipeline.executor import ModelCache
from expertkit.pipeline.sweep import Cell, add_executor_args, run_sweep, sweep_executor

# two choice tasks (one forward pass per example) and three generation tasks of at most 12 new tokens; gcd
# rather than leg_count, whose library expert barely learned (0.20 against gcd's 0.50 on 20 validation examples)
A_TASKS = ["family_relation", "reverse_words", "bbc_topic", "add_sub", "gcd"]
B_TASKS = ["family_relation", "reverse_words", "bbc_topic"]
B_FROM = Path("runs/experiments/portllm2")  # where experiments/portllm.py --out runs/experiments/portllm2 put them
B_LEVEL = "60:0.00025"
B_TRAIN = {"steps": 60, "batch_size": 8, "lr": 2e-3, "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"],
           "seed": 0}  # experiments/portllm.py's TRAIN
SMOKE_A, SMOKE_B = ["family_relation", "reverse_words", "gcd"], ["family_relation", "reverse_words"]
BEST_CLUSTER = "<best cluster>"  # a claim's system: the representative best on validation
SMOKE_TRAIN = {"steps": 2, "batch_size": 2, "rank": 2, "target_modules": ["q_proj", "v_proj"]}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a-tasks", nargs="+", default=A_TASKS, help="family A: GLIDER library experts of these tasks")
    p.add_argument("--b-tasks", nargs="+", default=B_TASKS, help="family B: experts of these tasks on the evolved base")
    p.add_argument("--b-from", type=Path, default=None,
                   help=f"folder of experiments/portllm.py's evolved bases and experts (default {B_FROM} when it holds "
                        "the base, else built under --out)")
    p.add_argument("--b-level", default=B_LEVEL, help="the evolved base, STEPS:LR (a PortLLM level)")
    p.add_argument("--n", type=int, default=300, help="test examples per task (the same for every system)")
    p.add_argument("--val-n", type=int, default=100, help="validation examples per task (every choice is made there)")
    p.add_argument("--budget", type=int, default=12, help="planner evaluations per cluster")
    p.add_argument("--group", default="embedding", choices=_groups(), help="tensor group the clustering uses")
    p.add_argument("--search", default="grid", choices=["grid", "cmaes"], help="coefficient search per cluster")
    p.add_argument("--no-bases", action="store_true", help="skip the two bases zero-shot (references)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and of the bootstrap")
    p.add_argument("--out", type=Path, default=None, help="default: runs/experiments/model_glue (smoke: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="a tiny random llama, 5 tiny experts, tiny n: checks it")
    add_executor_args(p)
    a = p.parse_args(argv)
    a.b_steps, a.b_lr = _level(a.b_level)
    for name in ("n", "val_n", "budget", "batch_size"):
        if getattr(a, name) < 1:
            raise SystemExit(f"model_glue: --{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}.")
    if a.smoke:
        a.a_tasks, a.b_tasks, a.n, a.val_n = SMOKE_A, SMOKE_B, min(a.n, 6), min(a.val_n, 4)
        a.budget, a.b_steps, a.b_lr = min(a.budget, 6), 2, 1e-2
        a.out = a.out or Path(tempfile.mkdtemp(prefix="model-glue-smoke-"))
    else:
        from expertkit.route import HELD_IN

        if missing := [t for t in a.a_tasks if t not in HELD_IN]:
            raise SystemExit(f"model_glue: --a-tasks {missing} have no expert in the GLIDER library; choose among "
                             f"{', '.join(HELD_IN)}.")
    for flag, tasks in (("--a-tasks", a.a_tasks), ("--b-tasks", a.b_tasks)):
        if len(set(tasks)) != len(tasks):
            raise SystemExit(f"model_glue: {flag} lists a task twice: {tasks}.")
    a.out = (a.out or Path("runs/experiments/model_glue")).absolute()  # absolute: Ray workers, adapter configs
    a.tag = f"{a.b_steps}-{a.b_lr:g}"
    if a.b_from is not None and not (a.b_from / f"base-{a.tag}" / "config.json").is_file():
        raise SystemExit(f"model_glue: --b-from {a.b_from} holds no evolved base base-{a.tag}/ (config.json); give the "
                         "--out of experiments/portllm.py with this --b-level, or leave --b-from out to build it.")
    if a.b_from is None:
        found = not a.smoke and (B_FROM / f"base-{a.tag}" / "config.json").is_file()
        a.b_from = B_FROM if found else a.out / "family-b"
    a.b_from = a.b_from.absolute()
    return a


def _groups() -> list[str]:
    """The tensor groups of a Llama (the zoo's architecture) and ``all``: ``--group``'s choices, checked
    before an hour of zoo building rather than after it."""
    from expertkit.weights.arch import descriptor_for

    return [*dict.fromkeys(p.group for p in descriptor_for("llama").patterns), "all"]


def _level(text: str) -> tuple[int, float]:
    """``"STEPS:LR"`` as (steps, lr)."""
    try:
        steps, lr = text.split(":")
        if int(steps) >= 1 and float(lr) > 0:
            return int(steps), float(lr)
    except ValueError:
        pass
    raise SystemExit(f"model_glue: --b-level is STEPS:LR with STEPS >= 1 and LR > 0 (for example 60:0.00025), "
                     f"got {text!r}")


def _check_splits(tasks: list[str], a: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Examples each task gives per split (fewer than asked is recorded; none is an error, before any work)."""
    from expertkit.tasks import get_task

    got = {}
    for t in tasks:
        task = get_task(t)
        got[t] = {s: len(task.examples(s, k, a.seed)) for s, k in (("validation", a.val_n), ("test", a.n))}
        if empty := [s for s, k in got[t].items() if k == 0]:
            raise SystemExit(f"model_glue: task {t} gives no examples in the {' and '.join(empty)} split; "
                             "drop it from --a-tasks / --b-tasks.")
    return got


# ---------------------------------------------------------------- the zoo


def base_a(a: argparse.Namespace) -> str:
    """Family A's base: the bundled model, or (smoke) a tiny random llama saved under ``out``."""
    if not a.smoke:
        return "smollm2-135m"
    from expertkit.models.tiny import saved_tiny

    return saved_tiny("llama", a.out / "tiny-llama")


def family_a(a: argparse.Namespace, base: Any) -> list[Path]:
    """The GLIDER library's adapters of ``a.a_tasks``: the cached library when finished (read only), else built."""
    from expertkit.route import LibraryConfig, build_library, default_library_dir
    from expertkit.route.build import library_exists
    from expertkit.route.library import ExpertLibrary
    from expertkit.weights.fingerprint import model_digest

    if a.smoke:
        cfg = LibraryConfig(model=str(base.path), tasks=a.a_tasks, train=SMOKE_TRAIN,
                            gates={"steps": 2, "batch_size": 2})
        lib = build_library(base, cfg, a.out / "library")
    else:
        root = default_library_dir(model_digest(base.model), LibraryConfig())
        lib = ExpertLibrary.load(root) if library_exists(root) else build_library(base, LibraryConfig())
    if missing := [t for t in a.a_tasks if lib.expert_for_task(t) is None]:
        raise SystemExit(f"model_glue: the library at {lib.root} has no expert for {missing}.")
    return [Path(lib.experts[lib.expert_for_task(t)].adapter).absolute() for t in a.a_tasks]


def _reusable(folder: Path, task: str, base_dir: Path, digest: str, fields: dict[str, Any]) -> bool:
    """Whether ``folder`` is a finished adapter of ``task`` trained with ``fields`` on the base ``base_dir``."""
    try:
        meta = json.loads((folder / "expertkit.json").read_text())
        named = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError):
        return False
    return (meta.get("task") == task and meta.get("base_digest") == digest and meta.get("config") == fields
            and (folder / "adapter_model.safetensors").is_file() and Path(named).resolve() == base_dir.resolve())


def family_b(a: argparse.Namespace, base: Any) -> tuple[Path, list[Path]]:
    """The evolved base and its experts of ``a.b_tasks``: from ``a.b_from`` when made there with these
    settings, else built (evolved, trained; resumable) under ``<out>/family-b``."""
    from expertkit.models import load_model
    from expertkit.port import evolve
    from expertkit.progress import note
    from expertkit.train import train_lora
    from expertkit.train.config import LoraTrainConfig
    from expertkit.weights.fingerprint import model_digest

    base_dir = a.b_from / f"base-{a.tag}"
    if not (base_dir / "config.json").is_file():  # only ever under <out>/family-b (see _args)
        evolve(base, base_dir, corpus="bbc", steps=a.b_steps, lr=a.b_lr, seed=0, overwrite=True,
               **({"batch_size": 2, "seq_len": 32} if a.smoke else {}))
    v2 = load_model(base_dir)
    config = LoraTrainConfig(**({**B_TRAIN, **SMOKE_TRAIN} if a.smoke else B_TRAIN))
    digest, fields, paths = model_digest(v2.model), config.training_fields(), []
    for t in a.b_tasks:
        there = a.b_from / f"experts-{a.tag}" / t
        if _reusable(there, t, base_dir, digest, fields):
            paths.append(there)
            continue
        mine = a.out / "family-b" / f"experts-{a.tag}" / t
        if there.exists() and there != mine:
            note(f"{there} was not trained with these settings on {base_dir}; training {t} into {mine}")
        train_lora(v2, t, mine, config)
        paths.append(mine)
    return base_dir, paths


def uniform_merge(members: list[Path], out: Path) -> Path:
    """Linear (uniform) merge of every zoo member, streamed tensor by tensor; rebuilt when the members change."""
    import shutil

    from expertkit.merge import merge_state_dicts
    from expertkit.merge.zoo import MemberWeights, discover_zoo
    from expertkit.weights import ShardedWriter

    recipe = json.dumps([[str(m), _stamp(m)] for m in members])
    stamp = out.parent / f"{out.name}.json"
    if (out / "config.json").exists() and stamp.is_file() and stamp.read_text() == recipe:
        return out
    shutil.rmtree(out, ignore_errors=True)
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
    from expertkit.fileio import write_atomic

    write_atomic(stamp, recipe)  # last: an interrupted merge has no stamp and is made again
    return out


def make_plan(args: argparse.Namespace, members: list[Path], tasks: list[str]) -> Any:
    """The zoo plan (:func:`~expertkit.merge.zoo.plan_zoo`), its candidates scored as jobs on the executor of
    ``args`` (work folder ``<out>/plan-jobs``, scores cached in ``<out>/eval-cache``)."""
    from expertkit.merge.zoo import plan_zoo
    from expertkit.pipeline.zoo_jobs import job_evaluator_factory

    work = (args.out / "plan-jobs").absolute()
    work.mkdir(parents=True, exist_ok=True)
    seed = args.seed  # the validation examples every other system scores
    executor = sweep_executor(args, ModelCache(), work)
    try:
        factory = job_evaluator_factory(executor, work, split="validation", n=args.val_n, seed=seed,
                                        cache_dir=args.out / "eval-cache")
        return plan_zoo(members, tasks, group=args.group, n=args.val_n, budget=args.budget, mixture="ffn",
                        search=args.search, seed=seed, evaluator_factory=factory)
    finally:
        executor.close()


def plan_and_build(a: argparse.Namespace, members: list[Path], tasks: list[str]) -> Any:
    """The plan (reused while its recipe holds) and its build in ``<out>/built`` (rebuilt when the plan changed)."""
    from expertkit.merge.zoo import build_plan, load_plan, save_plan
    from expertkit.merge.zoo.plan import plan_text

    from expertkit.fileio import write_atomic

    path, built, stamp = a.out / "plan.yaml", a.out / "built", a.out / "plan.members.json"
    contents = json.dumps([_stamp(m) for m in members])  # a member retrained in place is another plan
    plan = load_plan(path) if path.is_file() and stamp.is_file() and stamp.read_text() == contents else None
    if plan is None or (plan.tasks, [m.path for m in plan.members], plan.validation.n, plan.validation.budget,
                        plan.validation.search, plan.similarity.group, plan.seed) != (
            tasks, [str(m) for m in members], a.val_n, a.budget, a.search, a.group, a.seed):
        plan = make_plan(a, members, tasks)
        save_plan(plan, path)
        write_atomic(stamp, contents)
    done = built / "plan.yaml"
    if not ((built / "build.json").is_file() and done.is_file() and done.read_text() == plan_text(plan)):
        build_plan(plan, built, overwrite=True)
    return plan


# ---------------------------------------------------------------- evaluation cells


def hash_embed(prompts: list[str]) -> Any:
    """Smoke runs only: :class:`~expertkit.models.embedder.HashEmbedder`'s bag of words instead of MiniLM."""
    import torch

    from expertkit.models.embedder import HashEmbedder

    return torch.from_numpy(HashEmbedder().encode(prompts))


def _stamp(path: str | Path | None) -> list[Any] | None:
    """The content of a model folder or adapter (SHA-256 of each weight file); None for a bundled name.
    A member retrained into the same folder changes it, so plans, merges and cells made from the old
    weights are not reused."""
    if path is None or not Path(path).is_dir():
        return None
    return [[f.name, _sha256(str(f), f.stat().st_size, f.stat().st_mtime_ns)]
            for f in sorted(Path(path).glob("*.safetensors"))]


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """:func:`expertkit.fileio.sha256_file`, once per file version in this process (size and time in the key)."""
    from expertkit.fileio import sha256_file

    return sha256_file(path)


def score_cell(loaded: Any, *, task: str, split: str, n: int, seed: int, adapter: str | None, batch_size: int,
               result: str, key: dict[str, Any]) -> dict[str, Any]:
    """One (system, split, task) cell: per-example scores of ``loaded`` (+ ``adapter``), written to ``result``."""
    from expertkit.fileio import write_atomic
    from expertkit.tasks import evaluate

    r = evaluate(loaded, None, task, split=split, n=n, seed=seed, adapter=adapter, batch_size=batch_size)
    row = {"key": key, "scores": [float(s) for s in r.scores], "seconds": r.seconds}
    write_atomic(Path(result), json.dumps(row))
    return row


_MIXTURE: dict[tuple[Any, ...], tuple[list[Any], Any]] = {}  # (reps, smoke) -> (loaded reps, embed), per process


def routed_cell(*, reps: list[str], router: str, smoke: bool, task: str, split: str, n: int, seed: int,
                batch_size: int, result: str, key: dict[str, Any]) -> dict[str, Any]:
    """One task of the model-level mixture: the sequence router in ``router`` picks a representative per
    prompt (:func:`~expertkit.merge.mixture.evaluate_routed`); per-example scores and picks to ``result``."""
    from expertkit.fileio import write_atomic
    from expertkit.merge.mixture import SequenceRouter, evaluate_routed, minilm_embed
    from expertkit.models import load_model

    held = _MIXTURE.get((tuple(reps), smoke))
    if held is None:
        _MIXTURE.clear()
        held = _MIXTURE[(tuple(reps), smoke)] = ([load_model(r) for r in reps], hash_embed if smoke else minilm_embed())
    models, embed = held
    r = evaluate_routed(models, SequenceRouter.load(router), task, embed, split=split, n=n, seed=seed,
                        batch_size=batch_size)
    row = {"key": key, "scores": [float(s) for s in r["scores"]], "routed": r["routed"]}
    write_atomic(Path(result), json.dumps(row))
    return row


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_")


def cells(a: argparse.Namespace, systems: dict[str, dict[str, Any]], tasks: list[str]) -> list[Cell]:
    """The sweep: for each system (in order, so consecutive cells share a model) its splits and tasks."""
    out = []
    for label, s in systems.items():
        for split in s["splits"]:
            n = a.val_n if split == "validation" else a.n
            for t in tasks:
                result = a.out / "cells" / split / _slug(label) / f"{t}.json"
                common = {"task": t, "split": split, "n": n, "seed": a.seed, "batch_size": a.batch_size,
                          "result": str(result)}
                if s.get("reps"):
                    key = {"system": label, "reps": [[r, _stamp(r)] for r in s["reps"]], "router": s["router_digest"],
                           "task": t, "split": split, "n": n, "seed": a.seed}
                    out.append(Cell(f"{label}|{split}|{t}", routed_cell, result,
                                    {"reps": s["reps"], "router": s["router"], "smoke": a.smoke, **common, "key": key},
                                    None, {"key": key}))
                    continue
                key = {"system": label, "model": s["model"], "model_stamp": _stamp(s["model"]),
                       "adapter": s.get("adapter"), "adapter_stamp": _stamp(s.get("adapter")),
                       "task": t, "split": split, "n": n, "seed": a.seed}
                out.append(Cell(f"{label}|{split}|{t}", score_cell, result,
                                {"adapter": s.get("adapter"), **common, "key": key}, s["model"], {"key": key}))
    return out


def fit_router(a: argparse.Namespace, plan: Any, tasks: list[str]) -> tuple[Path, str] | None:
    """The model-level mixture's sequence router over the mixed representatives, written to ``<out>/router``;
    (folder, digest of its file), or None with fewer than two representatives."""
    from expertkit.merge.mixture import SequenceRouter, minilm_embed
    from expertkit.tasks import get_task

    mixed = plan.mixed_clusters()
    if len(mixed) < 2:
        return None
    prompts = [[get_task(t).format_prompt(e) for t in (c.tasks or tasks) for e in get_task(t).examples("train", 16, 0)]
               for c in mixed]
    router = SequenceRouter.fit([c.name for c in mixed], prompts, hash_embed if a.smoke else minilm_embed())
    path = router.save(a.out / "router")
    return path.parent, hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------- analysis (pure: scores in, numbers out)


def mean_accuracy(scores: dict[str, list[float]], tasks: list[str]) -> float:
    """Mean over ``tasks`` of the per-task accuracy."""
    return float(np.mean([np.mean(scores[t]) for t in tasks]))


def pooled(scores: dict[str, list[float]], tasks: list[str]) -> list[float]:
    """Per-example scores of every task, concatenated in the order of ``tasks``."""
    return [x for t in tasks for x in scores[t]]


def best_single(validation: dict[str, dict[str, list[float]]], members: list[str], tasks: list[str]) -> str:
    """The member with the highest mean *validation* accuracy over ``tasks`` (first in ``members`` on ties)."""
    return max(members, key=lambda m: (mean_accuracy(validation[m], tasks), -members.index(m)))


def oracle_choice(validation: dict[str, dict[str, list[float]]], members: list[str],
                  tasks: list[str]) -> dict[str, str]:
    """Per task, the member best on that task's *validation* examples (first in ``members`` on ties)."""
    return {t: max(members, key=lambda m: (float(np.mean(validation[m][t])), -members.index(m))) for t in tasks}


def analyse(test: dict[str, dict[str, list[float]]], validation: dict[str, dict[str, list[float]]],
            members: list[str], reps: dict[str, str], claims: list[tuple[str, str | None, str]], tasks: list[str],
            seed: int) -> dict[str, Any]:
    """Choices (on validation), the oracle's test scores, and every system against the best single model.

    ``reps``: cluster name -> system label; ``claims``: (subject, system label or None when not run, why not),
    the label :data:`BEST_CLUSTER` standing for the representative best on validation. Adds the ``oracle``
    system to ``test`` (a copy).
    """
    from expertkit.tasks.paired import compare, verdict

    test = dict(test)
    best = best_single(validation, members, tasks)
    chosen = oracle_choice(validation, members, tasks)
    test["oracle"] = {t: test[chosen[t]][t] for t in tasks}
    best_rep = best_single(validation, list(reps.values()), tasks) if reps else None
    paired, lines = {}, []
    for label in test:
        if label == best:
            continue
        res = compare(pooled(test[label], tasks), pooled(test[best], tasks), seed=seed)
        paired[label] = {"pooled": res.as_dict(),
                         "per_task": {t: compare(test[label][t], test[best][t], seed=seed).as_dict() for t in tasks}}
    for subject, label, why in claims:
        if label == BEST_CLUSTER:
            subject, label = f"{subject} ({best_rep}, chosen on validation)", best_rep
        text = f"{subject} is more accurate than the best single model ({best}, chosen on validation)"
        if label is None or label not in test:
            lines.append(f"{text}: not run ({why}).")
        elif label == best:
            lines.append(f"{text}: not shown (it is the best single model itself).")
        else:
            lines.append(verdict(text, compare(pooled(test[label], tasks), pooled(test[best], tasks), seed=seed)))
    return {"best_single": {"system": best, "validation": mean_accuracy(validation[best], tasks)},
            "best_cluster": {"system": best_rep,
                             "validation": mean_accuracy(validation[best_rep], tasks) if best_rep else None},
            "oracle": {"choice": chosen}, "test": test,
            "accuracy": {lab: {**{t: float(np.mean(s[t])) for t in tasks}, "mean": mean_accuracy(s, tasks)}
                         for lab, s in test.items()},
            "validation_accuracy": {lab: mean_accuracy(s, tasks) for lab, s in validation.items()},
            "paired": paired, "verdicts": lines}


# ---------------------------------------------------------------- report


def _plot(result: dict[str, Any], path: Path) -> None:
    """Pooled test accuracy per system, the best single model marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from expertkit.tasks.stats import wilson_interval

    acc, best, test = result["accuracy"], result["best_single"]["system"], result["scores"]["test"]
    labels = list(acc)
    means = np.array([acc[lab]["mean"] for lab in labels])
    ci = np.array([wilson_interval(sum(pooled(test[lab], result["tasks"])), len(pooled(test[lab], result["tasks"])))
                   for lab in labels])  # (systems, 2)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.4))
    colors = ["tab:red" if lab == best else "tab:grey" if lab in result["references"] else "tab:blue"
              for lab in labels]
    ax.barh(range(len(labels)), means, color=colors,
            xerr=np.clip(np.stack([means - ci[:, 0], ci[:, 1] - means]), 0, None), capsize=2)
    ax.axvline(acc[best]["mean"], color="tab:red", ls="--", lw=1, label=f"best single model ({best})")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"test accuracy over {len(result['tasks'])} tasks (n = {result['n']} each; 95% Wilson interval)")
    ax.set_title("Model-GLUE zoo against the best single model (grey: references)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The tables and verdict lines for docs/results.md."""
    tasks, acc, best = result["tasks"], result["accuracy"], result["best_single"]["system"]
    cmd = "experiments/model_glue.py" + (" --smoke" if result["smoke"] else "")
    lines = [f"Model-GLUE zoo of {len(result['zoo'])} experts in 2 families (`{cmd}`): test n = {result['n']} and "
             f"validation n = {result['val_n']} per task, the same examples for every system; choices made on "
             f"validation. Best single model: {best} (validation {result['best_single']['validation']:.3f}); "
             f"oracle per task: {', '.join(f'{t} -> {m}' for t, m in result['oracle']['choice'].items())}.", "",
             "| cluster | members | merge (chosen on validation) | validation score |", "|---|---|---|---:|"]
    for c in result["plan"]["clusters"]:
        score = "-" if c["validation"] is None else f"{c['validation']:.3f}"
        lines.append(f"| {c['name']} | {', '.join(c['members'])} | {c['method']}({', '.join(c['merged'])}) "
                     f"{c['params'] or ''} | {score} |")
    lines += ["", f"Planned mixture: {result['plan']['mixture']}; model-level mixture picks per task (test): "
              f"{json.dumps(result['routed']) if result['routed'] else 'not run'}.", "",
              "| system | " + " | ".join(tasks) + " | test mean | validation mean | - best single [95%] | McNemar p |",
              "|---|" + "---:|" * (len(tasks) + 4)]
    for lab, a in acc.items():
        p = result["paired"].get(lab)
        diff = "-" if p is None else (f"{p['pooled']['diff']:+.3f} [{p['pooled']['diff_ci'][0]:+.3f}, "
                                      f"{p['pooled']['diff_ci'][1]:+.3f}]")
        val = result["validation_accuracy"].get(lab)
        val_text = "-" if val is None else f"{val:.3f}"
        p_text = "-" if p is None else f"{p['pooled']['p_value']:.2g}"
        name = f"**{lab}**" if lab == best else lab
        lines.append(f"| {name} | " + " | ".join(f"{a[t]:.3f}" for t in tasks) + f" | {a['mean']:.3f} | "
                     f"{val_text} | {diff} | {p_text} |")
    lines += ["", *[f"- {v}" for v in result["verdicts"]]]
    return "\n".join(lines)


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> dict[str, Any]:  # noqa: PLR0915 - one experiment, step by step
    a = _args(argv)
    from expertkit.models import load_model
    from expertkit.pipeline.executor import model_source

    started = time.perf_counter()
    tasks = a.a_tasks + [t for t in a.b_tasks if t not in a.a_tasks]
    sizes = _check_splits(tasks, a)  # an unknown task or an empty split fails before any work
    a.out.mkdir(parents=True, exist_ok=True)
    source_a = model_source(base_a(a))
    loaded_a = load_model(source_a)
    a_paths = family_a(a, loaded_a)
    b_base, b_paths = family_b(a, loaded_a)
    zoo = {f"A:{t}": p for t, p in zip(a.a_tasks, a_paths, strict=True)}
    zoo |= {f"B:{t}": p for t, p in zip(a.b_tasks, b_paths, strict=True)}
    members, paths = list(zoo), list(zoo.values())
    t_zoo = time.perf_counter()

    plan = plan_and_build(a, paths, tasks)
    uniform = uniform_merge(paths, a.out / "uniform")
    routed = fit_router(a, plan, tasks)
    t_build = time.perf_counter()
    built = a.out / "built"
    label_of = {str(p): m for m, p in zoo.items()}
    names = {m.name: label_of[m.path] for m in plan.members}
    systems: dict[str, dict[str, Any]] = {}  # in run order: consecutive systems share a loaded model
    for family, base, label in (("A:", source_a, "base A (zero-shot)"),
                                ("B:", str(b_base), "base B, evolved (zero-shot)")):
        for m, p in zoo.items():
            if m.startswith(family):
                systems[m] = {"model": base, "adapter": str(p), "splits": ["validation", "test"]}
        if not a.no_bases:
            systems[label] = {"model": base, "splits": ["test"]}
    reps = {}
    for c in plan.clusters:
        reps[c.name] = label = f"planner {c.name}"  # its merge: results["plan"]
        systems[label] = {"model": str(built / "clusters" / c.name), "splits": ["validation", "test"]}
    systems[f"uniform merge (linear, all {len(zoo)})"] = {"model": str(uniform), "splits": ["test"]}
    if (built / "mixture").is_dir():
        systems["FFN mixture (Mixtral, top-1)"] = {"model": str(built / "mixture"), "splits": ["test"]}
    if routed is not None:
        systems["model-level mixture (MiniLM router)"] = {
            "reps": [str(built / "clusters" / c.name) for c in plan.mixed_clusters()], "router": str(routed[0]),
            "router_digest": routed[1], "splits": ["test"]}

    todo = cells(a, systems, tasks)
    executor = sweep_executor(a, ModelCache(source_a, loader=lambda: loaded_a), a.out)
    try:
        rows = run_sweep("model-glue", todo, executor, a.out / "logs")
    finally:
        executor.close()
    t_eval = time.perf_counter()
    scores: dict[str, dict[str, dict[str, list[float]]]] = {"validation": {}, "test": {}}
    picks: dict[str, dict[str, int]] = {}
    for cell, row in zip(todo, rows, strict=True):
        label, split, t = cell.key.split("|")
        scores[split].setdefault(label, {})[t] = row["scores"]
        if "routed" in row:
            picks[t] = row["routed"]

    mixture = "FFN mixture (Mixtral, top-1)"
    claims: list[tuple[str, str | None, str]] = [
        (f"the planner's merge of {c.name} ({c.method} of {', '.join(names[x] for x in c.merged)})", reps[c.name], "")
        for c in plan.clusters]
    claims += [("the planner's best cluster", BEST_CLUSTER, ""),
               (f"the uniform merge of all {len(zoo)} members", f"uniform merge (linear, all {len(zoo)})", ""),
               ("the FFN-level mixture of the representatives", mixture if mixture in systems else None,
                f"no FFN mixture was built: the plan's mixture is {plan.mixture.kind}"),
               ("the model-level mixture (MiniLM sequence router over the representatives)",
                "model-level mixture (MiniLM router)" if routed else None, "the plan has one cluster"),
               ("the oracle (per task the member best on validation; a reference)", "oracle", "")]
    res = analyse(scores["test"], scores["validation"], members, reps, claims, tasks, a.seed)
    result = {
        "smoke": a.smoke, "args": {k: str(v) for k, v in vars(a).items()}, "tasks": tasks, "n": a.n,
        "val_n": a.val_n, "examples": sizes,
        "zoo": [{"system": m, "family": m[0], "task": m[2:], "adapter": str(p),
                 "base": source_a if m.startswith("A:") else str(b_base)} for m, p in zoo.items()],
        "plan": {"clusters": [{"name": c.name, "system": reps[c.name], "members": [names[x] for x in c.members],
                               "method": c.method, "merged": [names[x] for x in c.merged], "params": c.params,
                               "validation": c.score, "trials": c.trials} for c in plan.clusters],
                 "mixture": plan.mixture.kind, "similarity": plan.similarity.model_dump()},
        "references": [s for s in systems if s.startswith("base ")] + ["oracle"],
        "scores": {"validation": scores["validation"], "test": res.pop("test")}, "routed": picks, **res,
        "seconds": {"zoo": round(t_zoo - started), "plan_build": round(t_build - t_zoo),
                    "evaluate": round(t_eval - t_build), "total": round(time.perf_counter() - started)},
    }
    from expertkit.fileio import write_atomic

    write_atomic(a.out / "results.json", json.dumps(result, indent=1))
    _plot(result, a.out / "model_glue.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    from expertkit.errors import ExpertkitError

    try:
        main()
    except ExpertkitError as exc:  # bad input: one line, no traceback
        raise SystemExit(f"model_glue: {exc}") from None
