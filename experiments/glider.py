"""GLIDER on SmolLM2-135M: global + local routing over 10 LoRA experts against every baseline.

    .venv/bin/python experiments/glider.py [--n 200] [--out runs/experiments/glider]
    .venv/bin/python experiments/glider.py --smoke      # a tiny random llama, tiny n: checks the script
    .venv/bin/python experiments/glider.py --executor ray [--address HOST:6379] [--cpus-per-cell 1]

1. The library (expertkit.route.build_library, cached and resumable): one LoRA expert and its
   Phatgoose gates per held-in task (``HELD_IN``, 10 suite tasks).
2. The global router's one free setting, how many written instructions of an expert's training inputs
   join its description in the expert's vector (``--expert-instructions``, grid 0 / 5 / 10 / 20), is
   chosen by top-1 retrieval on ``--n-val`` validation queries per held-in task (never test); GLIDER
   and the global router alone use the chosen value, the other methods do not read it.
3. Every method scores the same ``n`` test examples of each held-in and held-out task (``HELD_OUT``,
   4 suite tasks without an expert): GLIDER (alpha = the held-in preset on held-in tasks, the
   held-out preset on held-out ones, as the paper sets alpha per setting), GLIDER's global router
   alone, Phatgoose, Arrow (PEFT's router), LoraHub (fitted per task on 5 training examples),
   LoraRetriever-style top-1 retrieval, the uniform merge, the oracle expert (held-in only), the base.
4. Paired tests (exact McNemar, paired bootstrap) of GLIDER against each baseline, pooled over the
   held-in tasks and over the held-out ones; the global router's top-1 retrieval accuracy on the
   held-in queries; verdicts on the issue's three goals; a bar plot (``glider.png``).

Why n = 200 per task: pooled, 2,000 held-in pairs detect a 3-point difference with 10% of pairs
discordant (``mcnemar_sample_size(0.03, 0.1)`` = 868) and 800 held-out pairs a 5-point one with 15%
discordant (``mcnemar_sample_size(0.05, 0.15)`` = 468).

Writes ``<out>/results.json`` and ``<out>/glider.png`` and prints the markdown for docs/results.md.
Instructions are cached per query, experts per recipe and each (method, task) cell's scores in
``<out>/cells/``, so an interrupted run resumes where it stopped. ``--save-kept`` copies the finished
cells into experiments/results/glider/cells and packs the instruction cache into
experiments/results/glider/instructions.jsonl (both committed); every run first puts them back where
missing. A cell's key holds the library's content digest (not its folder), so kept cells are reused
only where the rebuilt library is byte for byte the same; kept instructions are keyed by the writer's
weights, template and query.

Every (method, task) cell is independent: ``--executor ray`` runs them as Ray tasks
(:mod:`expertkit.pipeline.sweep`; per-cell logs in ``<out>/logs``): each worker loads the base model
once, and each cell opens the library from its folder and makes its embedder and instruction writer
(instructions come from the shared cache folder). The default ``--executor local`` runs them one
after the other in this process, on the driver's model, embedder and writer, as a plain loop would.
The library is built (or found) in the driver before the sweep, and the global router's top-1
retrieval is measured there after it.

Cost on 2 cores, measured in session 20: the library about 25 min (10 experts at 1-2.5 min of
training each, plus gates); instructions about 0.3 s a query (batches of 8); a (method, task) cell
0.3-3.5 min (choice tasks with long prompts, bbc_topic, are the slowest): a held-in task's nine
cells 3 min (reverse_words, leg_count) to 30 min (bbc_topic). The whole run is about 3 h.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from expertkit.pipeline.sweep import Cell, add_executor_args, run_sweep, sweep_executor

KEPT = Path(__file__).resolve().parent / "results" / "glider"
BASELINES = ("global", "phatgoose", "arrow", "lorahub", "retrieval", "uniform", "oracle", "base")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    from expertkit.route import HELD_IN, HELD_OUT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="test examples per task (the same for every method)")
    p.add_argument("--held-in", nargs="+", default=list(HELD_IN), help="tasks with an expert")
    p.add_argument("--held-out", nargs="+", default=list(HELD_OUT), help="tasks without an expert")
    p.add_argument("--methods", nargs="+", default=["glider", *BASELINES])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert-instructions", type=int, nargs="+", default=[0, 5, 10, 20],
                   help="grid of RouteConfig.expert_instructions for GLIDER and its global router, chosen by "
                        "top-1 retrieval on validation queries (one value: no choice)")
    p.add_argument("--n-val", type=int, default=100, help="validation queries per held-in task for that choice")
    p.add_argument("--out", type=Path, default=None, help="default: runs/experiments/glider (smoke: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="a tiny random llama, 2 experts, tiny n: checks the script")
    p.add_argument("--kept", type=Path, default=None,
                   help="committed results of earlier runs (cells/*.json, instructions.jsonl), put into --out and "
                        "the instruction cache where missing before the run (default: experiments/results/glider; "
                        "smoke: none)")
    p.add_argument("--save-kept", action="store_true",
                   help="copy --out's finished cells and pack the instruction cache into --kept, then exit "
                        "(safe beside a running sweep: cells are written whole)")
    add_executor_args(p)
    a = p.parse_args(argv)
    if a.smoke:
        a.held_in, a.held_out, a.n = ["reverse_words", "leap_year"], ["gcd"], min(a.n, 3)  # short prompts: 256 positions
        a.n_val = min(a.n_val, 3)
        a.out = a.out or Path(tempfile.mkdtemp(prefix="glider-smoke-"))
    a.out = a.out or Path("runs/experiments/glider")
    if a.kept is None and not a.smoke:
        a.kept = KEPT
    if a.executor == "ray":
        a.out = a.out.absolute()  # the workers' working folder may differ from this one
    return a


def _model(args: argparse.Namespace) -> str:
    """The base model (smoke: a tiny random llama saved under ``out``, as the library's config names it)."""
    from expertkit.models.tiny import saved_tiny

    return saved_tiny("llama", args.out / "tiny") if args.smoke else "smollm2-135m"


def _library(args: argparse.Namespace, loaded: object, model: str) -> object:
    """The expert library of the held-in tasks on ``loaded`` (the model ``model``): built, resumed or reused."""
    from expertkit.route import LibraryConfig, build_library

    if args.smoke:
        cfg = LibraryConfig(model=model, tasks=args.held_in, gates={"steps": 2, "batch_size": 2},
                            train={"steps": 2, "batch_size": 2, "rank": 2, "target_modules": ["q_proj", "v_proj"]})
        return build_library(loaded, cfg)
    return build_library(loaded, LibraryConfig(tasks=args.held_in))


def _instructions(args: argparse.Namespace) -> Path:
    """The instruction writer's cache folder (smoke: under ``out``), absolute for the workers."""
    from expertkit.route.api import instruction_cache

    return (args.out / "instructions" if args.smoke else instruction_cache()).absolute()


# (loaded, embedder, writer) per (smoke, instruction folder), filled by the first cell or the driver's
# top-1 measurement; a Ray cell gets its own empty copy with its function, so it makes its own
_TOOLS: dict[tuple[bool, str], tuple[object, object, object]] = {}


def _tools(loaded: object, smoke: bool, instructions: str | Path) -> tuple[object, object]:
    """(embedder, instruction writer) on ``loaded``, made once and shared by the local cells and the
    driver, as one pair served the whole run before the cells (smoke: :class:`HashEmbedder` and a
    4-token writer; real: MiniLM and the default writer)."""
    from expertkit.models.embedder import HashEmbedder, load_embedder
    from expertkit.route import InstructionWriter

    key = (smoke, str(instructions))
    held = _TOOLS.get(key)
    if held is None or held[0] is not loaded:
        if smoke:
            made = (HashEmbedder(), InstructionWriter(loaded, cache_dir=instructions, max_new_tokens=4,
                                                      template="Input: {query}\nTask:", max_query_chars=60))
        else:
            made = (load_embedder(), InstructionWriter(loaded, cache_dir=instructions))
        held = _TOOLS[key] = (loaded, *made)
    return held[1], held[2]


def score_cell(loaded: object, library: str, config: dict, task: str, n: int, seed: int, batch_size: int,
               smoke: bool, instructions: str, result: str, key: dict) -> dict:
    """One (method, task) cell: the per-example scores of the router of ``config`` on the first ``n``
    test examples (``seed``) of ``task``, written to ``result`` as ``{"key": key, "scores": [...]}``.

    ``library`` is the library's folder (opened here, so that a Ray worker reads the same experts);
    ``instructions`` the instruction writer's cache folder.
    """
    from expertkit.fileio import write_atomic
    from expertkit.route import ExpertLibrary, RouteConfig
    from expertkit.route.api import make_router
    from expertkit.route.evaluate import evaluate_router
    from expertkit.tasks import get_task

    embedder, writer = _tools(loaded, smoke, instructions)
    router = make_router(loaded, ExpertLibrary.load(library), RouteConfig.model_validate(config),
                         embedder=embedder, writer=writer)
    spec = get_task(task)
    examples = spec.examples("test", n, seed)  # the same examples for every method
    got = [r.score for r in evaluate_router(router, spec, examples, batch_size=batch_size)]
    row = {"key": key, "scores": got}
    Path(result).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(result), json.dumps(row))
    return row


def sweep(args: argparse.Namespace, model: str, library: object) -> list[Cell]:
    """The cells in run order: per task (held-in, then held-out), every method (no oracle held-out).

    A cell's result file is kept only when its ``key`` (the library's content digest, route config,
    task, n) is the one this run would write: cells made on another machine are reused only when its
    library was built byte for byte the same.
    """
    from expertkit.route import RouteConfig

    digest = library.digest()
    cells = []
    for name in [*args.held_in, *args.held_out]:
        held_in = name in args.held_in
        for method in args.methods:
            if method == "oracle" and not held_in:
                continue
            extra = {"expert_instructions": args.chosen_k} if method in ("glider", "global") else {}
            cfg = RouteConfig(method=method, top_k=args.top_k, alpha="held_in" if held_in else "held_out",
                              seed=args.seed, **extra).model_dump(mode="json")
            key = {"library": digest, "config": cfg, "task": name, "n": args.n}
            result = args.out / "cells" / f"{method}-{name}.json"
            cells.append(Cell(f"{method}-{name}", score_cell, result,
                              {"library": str(Path(library.root).absolute()), "config": cfg, "task": name,
                               "n": args.n, "seed": args.seed, "batch_size": args.batch_size, "smoke": args.smoke,
                               "instructions": str(_instructions(args)), "result": str(result), "key": key},
                              model, {"key": key}))
    return cells


def choose_expert_instructions(args: argparse.Namespace, loaded: object, library: object) -> dict:
    """Step 0: the global router's ``expert_instructions`` with the best top-1 retrieval on the first
    ``n_val`` *validation* queries of each held-in task (ties: the smaller value; test is never used).
    Sets ``args.chosen_k`` and returns ``{"grid", "validation": {k: accuracy}, "chosen", "against_default"}``,
    the last a paired test of the chosen value's hits against the RouteConfig default's."""
    from expertkit.route import RouteConfig
    from expertkit.route.api import global_top1, make_router
    from expertkit.tasks.paired import compare

    grid = sorted(set(args.expert_instructions))
    default = RouteConfig().expert_instructions
    if len(grid) == 1:
        args.chosen_k = grid[0]
        return {"grid": grid, "validation": {}, "chosen": grid[0], "against_default": None}
    embedder, writer = _tools(loaded, args.smoke, _instructions(args))
    hits, val = {}, {}
    for k in grid:
        router = make_router(loaded, library, RouteConfig(method="global", seed=args.seed, expert_instructions=k),
                             embedder=embedder, writer=writer)
        res = global_top1(router, library, args.held_in, n=args.n_val, split="validation", seed=args.seed)
        hits[k], val[k] = res["hits"], res["accuracy"]
        print(f"validation top-1 with expert_instructions = {k}: {res['accuracy']:.3f} (n = {res['n']})", flush=True)
    chosen = max(grid, key=lambda k: (val[k], -k))
    args.chosen_k = chosen
    against = None
    if default in hits and chosen != default:
        against = compare([float(h) for h in hits[chosen]], [float(h) for h in hits[default]], seed=args.seed).as_dict()
    return {"grid": grid, "validation": val, "chosen": chosen, "against_default": against}


def _evaluate(args: argparse.Namespace, models: object, model: str,
              library: object) -> dict[str, dict[str, list[float]]]:
    """``{method: {task: scores}}`` over every cell of :func:`sweep`, run on the executor of ``args``."""
    cells = sweep(args, model, library)
    executor = sweep_executor(args, models, args.out)
    try:
        rows = run_sweep("glider", cells, executor, args.out / "logs")
    finally:
        executor.close()
    scores: dict[str, dict[str, list[float]]] = {m: {} for m in args.methods}
    for cell, row in zip(cells, rows, strict=True):
        method, name = cell.kwargs["config"]["method"], cell.kwargs["task"]
        scores[method][name] = row["scores"]
        print(f"{method:>10} {name:<16} {np.mean(row['scores']):.3f}", flush=True)
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


def restore_kept(args: argparse.Namespace) -> None:
    """Cells and instructions committed under ``--kept`` put into ``--out/cells`` and the instruction
    cache where missing; a kept cell is then used only if its key (library content digest, config, task,
    n) is the one this run would write."""
    import shutil

    from expertkit.route.global_router import unpack_instructions

    if args.kept is None:
        return
    pack = args.kept / "instructions.jsonl"
    if pack.is_file():
        print(f"instructions restored from {pack}: {unpack_instructions(pack, _instructions(args))}", flush=True)
    (args.out / "cells").mkdir(parents=True, exist_ok=True)
    for cell in sorted((args.kept / "cells").glob("*.json")):
        if not (args.out / "cells" / cell.name).is_file():
            shutil.copy2(cell, args.out / "cells" / cell.name)


def save_kept(args: argparse.Namespace) -> None:
    """``--out``'s cells copied into ``--kept/cells`` and the instruction cache packed into
    ``--kept/instructions.jsonl``, to be committed."""
    import shutil

    from expertkit.route.global_router import pack_instructions

    if args.kept is None:
        raise SystemExit("--save-kept needs --kept (smoke runs keep nothing).")
    (args.kept / "cells").mkdir(parents=True, exist_ok=True)
    cells = sorted((args.out / "cells").glob("*.json"))
    for cell in cells:
        shutil.copy2(cell, args.kept / "cells" / cell.name)
    n = pack_instructions(_instructions(args), args.kept / "instructions.jsonl")
    print(f"kept in {args.kept}: {len(cells)} cells, {n} instructions")


def main(argv: list[str] | None = None) -> None:  # noqa: PLR0915 - one linear experiment
    args = _args(argv)
    if args.save_kept:
        save_kept(args)
        return
    restore_kept(args)
    from expertkit.pipeline.executor import ModelCache, model_source
    from expertkit.route import RouteConfig
    from expertkit.route.api import global_top1, make_router
    from expertkit.tasks.paired import compare, verdict

    args.out.mkdir(parents=True, exist_ok=True)
    model = _model(args)
    source = model_source(model)  # a folder made absolute, for the workers
    models = ModelCache(source)  # local: the driver's model is the one every cell runs on
    loaded = models.get(source)
    library = _library(args, loaded, model)
    print(f"library {library.root}: content digest {library.digest()}", flush=True)
    choice = choose_expert_instructions(args, loaded, library)
    scores = _evaluate(args, models, source, library)
    embedder, writer = _tools(loaded, args.smoke, _instructions(args))
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
    router = make_router(loaded, library, RouteConfig(method="global", seed=args.seed, expert_instructions=args.chosen_k),
                         embedder=embedder, writer=writer)
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
              "global_top1": {k: top1[k] for k in ("accuracy", "n", "per_task")}, "expert_instructions": choice,
              "goals": goals, "verdicts": lines, "smoke": args.smoke}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    _plot(acc, args.out / "glider.png")
    print(f"\n## GLIDER (n = {args.n} per task; command: experiments/glider.py"
          f"{' --smoke' if args.smoke else ''})\n")
    print("| method | held-in | held-out |\n|---|---:|---:|")
    for m, a in acc.items():
        print(f"| {m} | {a.get('held_in', float('nan')):.3f} | {a.get('held_out', float('nan')):.3f} |")
    if choice["validation"]:
        print("\nexpert_instructions chosen on validation top-1: " + ", ".join(
            f"{k}: {v:.3f}" for k, v in choice["validation"].items()) + f" -> {choice['chosen']}"
              + (f" (against the default: {choice['against_default']['diff']:+.3f}, "
                 f"p = {choice['against_default']['p_value']:.2g})" if choice["against_default"] else ""))
    print(f"\nGlobal router top-1 retrieval on held-in queries: {top1['accuracy']:.3f} (n = {top1['n']}).\n")
    for line in lines:
        print(f"- {line}")
    for name, g in goals.items():
        print(f"- goal {name}: {'met' if g['met'] else 'NOT met'} ({', '.join(f'{k} {v}' for k, v in g.items() if k != 'met')})")


if __name__ == "__main__":
    main()
