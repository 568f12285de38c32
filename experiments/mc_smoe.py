"""MC-SMoE at small scale: merge the bundled MoE's experts 8 -> 4 and 8 -> 2, then compress them.

    .venv/bin/python experiments/mc_smoe.py [--moe PATH] [--out runs/experiments/mc_smoe] [--smoke]
        [--executor {local,ray}] [--address HOST:6379]

1. The subject is the bundled MoE (``expertkit moe build``'s default recipe, reused from its cache;
   ``--moe`` names another folder). Routing statistics and REAP scores are collected once on
   validation prompts of the MoE's own tasks; every method gets the same statistics and the same
   per-layer expert counts (the adaptive global frequency threshold), so their expert parameter
   counts are equal exactly.
2. Systems, per target ``E'`` in ``--experts`` (8 -> 4, 8 -> 2) and per method (M-SMoE and every
   baseline): (a) merge/prune only; (b) + the C step at the low-rank keep that removes ``--removed``
   (80%) of the expert parameters in all; (c) (b) + ``--kd-steps`` of distillation from the original.
3. Settings are chosen on the validation split only: the sparse share of the C step (per method,
   from ``--sparse-shares``) and the distillation learning rate (per method, ``--kd-lrs``).
4. n: a pilot on validation measures how often M-SMoE 8 -> 4 and the original disagree; ``n`` per
   task is the larger of ``--min-n`` and ``mcnemar_sample_size(--delta, that share) / tasks``.
5. Test: every system on the same ``n`` test examples of every task, paired tests (exact McNemar,
   paired bootstrap) against the original and M-SMoE against each baseline at equal parameters;
   held-out perplexity per 128-token block (Wilcoxon); a Pareto plot (expert parameters vs accuracy).

Cost: per E' and method, 1 + len(--sparse-shares) compressions plus one per distillation lr; each is
scored on ``--val-n`` validation examples per task (the C and KD variants) and every chosen system on
``n`` test examples per task. ``--kd-methods``, ``--sparse-shares`` and ``--methods`` shrink the grid.

Writes ``<out>/results.json`` and ``<out>/pareto.png`` and prints the markdown for docs/results.md.
Compressed models are kept in ``<out>/models/<label>`` and evaluations are cached, so a run resumes.
Cells and results carry the MoE's weight digest (``moe_digest``): cells saved in another session (for
example those committed in ``experiments/results/mc_smoe/cells``, copied into ``<out>/cells``) are reused
when the MoE is byte-identical, and another MoE's ``results.json`` is refused rather than mixed in.
``--smoke`` runs everything on a tiny random 8-expert Mixtral in seconds (a check of the script).

Each (method, E') is a cell of a sweep (:mod:`expertkit.pipeline.sweep`): its compressions, its
choices on validation and its test scores and held-out NLL, written to ``<out>/cells/<method>-<E'>.json``
(a finished cell is skipped on a rerun). ``--executor ray`` runs the cells as Ray tasks (per-cell logs
in ``<out>/logs``), the default one after the other in this process, in the order of step 2. The
driver computes what the cells share once (the routing statistics and REAP scores of step 1, the
pilot of step 4) and saves the statistics under ``<out>/calibration/`` (``stats.npz`` and
``stats.json``: :meth:`~expertkit.moe.stats.RoutingStats.save`; ``reap.npy``; ``blocks.npy``, the
held-out blocks), which each cell reads back: the same numbers in any process.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from expertkit.pipeline.executor import ModelCache
from expertkit.pipeline.sweep import Cell, add_executor_args, run_sweep, saved_results, sweep_executor

BASELINES = ("average", "random_group", "hcsmoe", "prune_frequency", "reap")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moe", type=Path, default=None, help="MoE folder (default: the bundled MoE, from its cache)")
    p.add_argument("--out", type=Path, default=None, help="default: runs/experiments/mc_smoe (smoke: a temp folder)")
    p.add_argument("--experts", type=int, nargs="+", default=[4, 2], help="experts kept per layer (E')")
    p.add_argument("--methods", nargs="+", default=["msmoe", *BASELINES])
    p.add_argument("--removed", type=float, default=0.8, help="share of expert parameters removed with the C step")
    p.add_argument("--sparse-shares", type=float, nargs="+", default=[0.0, 0.2], help="C step grid (validation)")
    p.add_argument("--kd-steps", type=int, default=100, help="distillation steps (0: none)")
    p.add_argument("--kd-methods", nargs="+", default=None, help="methods that get distillation (default: all)")
    p.add_argument("--kd-lrs", type=float, nargs="+", default=[1e-4], help="distillation lr grid (validation)")
    p.add_argument("--kd-batch", type=int, default=8)
    p.add_argument("--cal-n", type=int, default=32, help="calibration prompts per task (validation split)")
    p.add_argument("--val-n", type=int, default=50, help="validation examples per task (choosing settings, pilot)")
    p.add_argument("--min-n", type=int, default=300, help="fewest test examples per task")
    p.add_argument("--delta", type=float, default=0.03, help="accuracy difference the pooled test must detect")
    p.add_argument("--blocks", type=int, default=64, help="held-out text blocks of 128 tokens")
    p.add_argument("--tasks", nargs="+", default=None, help="default: the MoE's build tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny random 8-expert MoE, tiny n: checks the script")
    add_executor_args(p)
    a = p.parse_args(argv)
    if a.smoke:
        a.tasks = a.tasks or ["add_sub", "gcd"]
        a.cal_n, a.val_n, a.min_n, a.kd_steps, a.kd_batch, a.blocks, a.delta = 4, 4, 6, 2, 2, 4, 0.4
        a.out = a.out or Path(tempfile.mkdtemp(prefix="mc-smoe-smoke-"))
    a.out = a.out or Path("runs/experiments/mc_smoe")
    if a.executor == "ray":
        a.out = a.out.absolute()  # the workers' working folder may differ from this one
    return a


def smoke_moe(folder: Path) -> Path:
    """A tiny random Mixtral with 8 experts (top-2) whose experts are scaled up so that they matter."""
    import torch

    from expertkit.models.tiny import tiny_model, tiny_tokenizer
    from expertkit.moe.compressed import experts_modules

    model = tiny_model("mixtral", 0, num_local_experts=8)
    with torch.no_grad():
        for _router, experts in experts_modules(model).values():
            experts.gate_up_proj.mul_(6.0)  # (E, 2I, H)
            experts.down_proj.mul_(6.0)  # (E, H, I)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def base_config(args: argparse.Namespace, folder: Path, tasks: list[str]) -> dict[str, Any]:
    """The :class:`CompressConfig` items every system shares."""
    return {"model": str(folder), "experts_per_layer": 4, "seed": args.seed, "stock": False,
            "calibration": {"tasks": tasks, "n": args.cal_n, "split": "validation"}}


def calibrate_once(args: argparse.Namespace, folder: Path, tasks: list[str], original: Any) -> Runner:
    """Step 1 in the driver: the routing statistics and REAP scores (REAP's recipe collects both in one
    call), saved under ``<out>/calibration/`` for the cells (:func:`load_calibration`); the driver's runner."""
    import numpy as np

    from expertkit.fileio import write_atomic
    from expertkit.moe.compress import CompressConfig, calibrate

    stats, reap = calibrate(CompressConfig(**{**base_config(args, folder, tasks), "method": "reap"}), folder, original)
    where = args.out / "calibration"
    stats.save(where / "stats.npz")  # atomic, with stats.json beside it
    buf = io.BytesIO()
    np.save(buf, reap, allow_pickle=False)
    write_atomic(where / "reap.npy", buf.getvalue())
    return Runner(args, folder, tasks, stats, reap, original)


def load_calibration(where: Path) -> tuple[Any, Any]:
    """``(RoutingStats, REAP scores)`` saved by :func:`calibrate_once`."""
    import numpy as np

    from expertkit.moe.stats import RoutingStats

    return RoutingStats.load(where / "stats.npz"), np.load(where / "reap.npy", allow_pickle=False)


class Runner:
    """Compresses (resumably) and scores systems on the same examples.

    ``stats`` / ``reap``: the routing statistics and REAP scores every compression shares (see
    :func:`calibrate_once`); ``original``: the loaded MoE, needed only to score it (``path`` None);
    ``eval_cache``: the evaluation cache (default ``$EXPERTKIT_CACHE/eval``; a cell is given the driver's).
    """

    def __init__(self, args: argparse.Namespace, folder: Path, tasks: list[str], stats: Any, reap: Any,
                 original: Any = None, eval_cache: Path | None = None) -> None:
        from expertkit.models.bundled import cache_root

        self.args, self.folder, self.tasks = args, folder, tasks
        self.original, self.stats, self.reap = original, stats, reap
        self.eval_cache = (eval_cache or cache_root() / "eval").absolute()
        self.base = base_config(args, folder, tasks)
        self.records: dict[str, dict[str, Any]] = {}

    def compress(self, label: str, method: str, experts: int, keep: float | None, share: float,
                 kd_lr: float | None) -> Path:
        """``<out>/models/<label>``, reused when its recipe is unchanged."""
        from expertkit.moe.compress import CompressConfig, compress_moe

        cfg = CompressConfig(**{**self.base, "method": method, "experts_per_layer": experts,
                                "lowrank": {"keep": keep, "sparse_share": share},
                                "kd": {"steps": self.args.kd_steps if kd_lr else 0, "lr": kd_lr or 1e-4,
                                       "batch_size": self.args.kd_batch}})
        path = self.args.out / "models" / label
        record = path / "compress.json"
        if record.is_file() and json.loads(record.read_text()).get("config") == cfg.model_dump(mode="json"):
            self.records[label] = json.loads(record.read_text())
            return path
        self.records[label] = compress_moe(cfg, path, overwrite=True, stats=self.stats, reap=self.reap).record
        return path

    def scores(self, path: Any, split: str, n: int) -> dict[str, list[float]]:
        """Per-task scores of the original (``path`` None), a compressed folder or a loaded model on ``n``
        examples each."""
        from expertkit.models import LoadedModel, load_model
        from expertkit.tasks.evaluate import evaluate

        model = self.original if path is None else path if isinstance(path, LoadedModel) else load_model(path)
        return {t: evaluate(model, None, t, split=split, n=n, seed=self.args.seed, batch_size=64,
                            cache_dir=self.eval_cache).scores for t in self.tasks}


def _pool(rows: dict[str, list[float]]) -> list[float]:
    return [s for t in sorted(rows) for s in rows[t]]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


System = tuple[str, int, "float | None", float, "float | None", Path]  # method, E', keep, share, kd lr, folder


def plan(run: Runner, m: str, e: int) -> dict[str, System]:
    """The systems of method ``m`` at ``e`` experts per layer with their folders; the C step's sparse share
    and the distillation lr are chosen by validation accuracy (the chosen folder is the one tested)."""
    a = run.args
    systems: dict[str, System] = {}

    def best(options: dict[Any, tuple[float, Path]]) -> tuple[Any, Path]:
        key = max(options, key=lambda k: (options[k][0], -k))  # ties: the smaller setting
        return key, options[key][1]

    def val(path: Path) -> tuple[float, Path]:
        return _mean(_pool(run.scores(path, "validation", a.val_n))), path

    keep = round(min(1.0, (1 - a.removed) * run.stats.num_experts / e), 6)  # 0.4, not 0.39999
    systems[f"{m}-{e}"] = (m, e, None, 0.0, None, run.compress(f"{m}-{e}", m, e, None, 0.0, None))
    share, path = best({s: val(run.compress(f"{m}-{e}-C{s:g}", m, e, keep, s, None)) for s in a.sparse_shares})
    systems[f"{m}-{e}-C"] = (m, e, keep, share, None, path)
    run.records[f"{m}-{e}-C"] = run.records[path.name]
    if _distilled(a, m):
        lr, path = best({lr: val(run.compress(f"{m}-{e}-C{share:g}-KD{lr:g}", m, e, keep, share, lr))
                         for lr in a.kd_lrs})
        systems[f"{m}-{e}-C-KD"] = (m, e, keep, share, lr, path)
        run.records[f"{m}-{e}-C-KD"] = run.records[path.name]
    return systems


def _distilled(a: argparse.Namespace, m: str) -> bool:
    return bool(a.kd_steps and a.kd_lrs and m in (a.kd_methods or a.methods))


def cell_settings(a: argparse.Namespace, folder: Path, tasks: list[str], m: str, e: int, n: int) -> dict[str, Any]:
    """What the result of the cell (``m``, ``e``) depends on: its saved file is reused only when they match."""
    keys = ("removed", "sparse_shares", "kd_steps", "kd_lrs", "kd_batch", "cal_n", "val_n", "blocks", "seed")
    # the MoE by its weights' digest, not its folder: saved cells can be carried to another machine or
    # session and are reused only for a byte-identical MoE (a path names no weights)
    return {"moe_digest": a.moe_digest, "tasks": list(tasks), "method": m, "experts": e, "n": n,
            "distilled": _distilled(a, m), **{k: getattr(a, k) for k in keys}}


def system_cell(*, args: argparse.Namespace, folder: Path, tasks: list[str], method: str, experts: int, n: int,
                eval_cache: Path, result: Path) -> dict[str, Any]:
    """One cell: the systems of ``method`` at ``experts`` per layer (:func:`plan`), each scored on ``n``
    test examples per task (cached in ``eval_cache``) and on the held-out blocks; written to ``result``
    and returned."""
    import numpy as np
    import torch

    from expertkit.fileio import write_atomic
    from expertkit.models import load_model
    from expertkit.tasks.perplexity import block_nll

    where = args.out / "calibration"
    run = Runner(args, folder, tasks, *load_calibration(where), eval_cache=eval_cache)
    blocks = torch.from_numpy(np.load(where / "blocks.npy", allow_pickle=False))  # (blocks, 128)
    rows = []
    for label, (m, e, keep, share, lr, path) in plan(run, method, experts).items():
        loaded = load_model(path)
        rows.append({"label": label, "method": m, "experts": e, "keep": keep, "share": share, "kd_lr": lr,
                     "folder": str(path), "record": run.records[label], "test": run.scores(loaded, "test", n),
                     "nll": block_nll(loaded.model, blocks)})
    out = {"settings": cell_settings(args, folder, tasks, method, experts, n), "systems": rows}
    write_atomic(result, json.dumps(out, indent=1) + "\n")
    return out


def sweep(run: Runner, n: int) -> list[Cell]:
    """One cell per E' (outer) and method (inner), the order of the systems in the results."""
    a = run.args
    cells = []
    for e in a.experts:
        for m in a.methods:
            result = a.out / "cells" / f"{m}-{e}.json"
            cells.append(Cell(f"{m}-{e}", system_cell, result, {
                "args": a, "folder": run.folder, "tasks": run.tasks, "method": m, "experts": e, "n": n,
                "eval_cache": run.eval_cache, "result": result}, match={"settings": cell_settings(a, run.folder, run.tasks, m, e, n)}))
    return cells


def choose_n(run: Runner) -> tuple[int, float]:
    """Test examples per task from a validation pilot: M-SMoE at the first E' against the original."""
    from expertkit.tasks.paired import mcnemar_sample_size

    a = run.args
    pilot = run.scores(run.compress(f"msmoe-{a.experts[0]}", "msmoe", a.experts[0], None, 0.0, None), "validation", a.val_n)
    orig = _pool(run.scores(None, "validation", a.val_n))
    disc = _mean([float((x >= 0.5) != (y >= 0.5)) for x, y in zip(_pool(pilot), orig, strict=True)])
    pooled = mcnemar_sample_size(a.delta, min(1.0, max(disc, 2 * a.delta)))
    return max(a.min_n, math.ceil(pooled / len(run.tasks))), disc


def within(claim: str, r: Any, margin: float) -> str:
    """Non-inferiority line: the bootstrap interval of (system - original) against ``-margin``."""
    word = "supported" if r.diff_low >= -margin else ("contradicted" if r.diff_high < -margin else "not shown")
    return (f"{claim}: {word}; difference {r.diff:+.3f} [{r.diff_low:+.3f}, {r.diff_high:+.3f}] against "
            f"-{margin:.2f}, exact McNemar p = {r.p_value:.2g} (n = {r.n}).")


def pareto(points: list[dict[str, Any]], original: float, path: Path) -> None:
    """Expert parameters against pooled test accuracy, one marker per stage, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({p["method"] for p in points})
    colours = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    labelled: set[str] = set()  # one legend entry per method, however many expert counts it was run at
    for p in points:
        label = None
        if p["stage"] == "" and p["method"] not in labelled:
            label = p["method"]
            labelled.add(label)
        ax.scatter(p["params"] / 1e6, p["accuracy"], color=colours[p["method"]], marker={"": "o", "C": "s", "C-KD": "*"}[p["stage"]],
                   s=70 if p["stage"] == "C-KD" else 40, label=label)
    ax.axhline(original, color="grey", ls="--", lw=1, label="original MoE")
    ax.set_xlabel("expert parameters (millions)")
    ax.set_ylabel("test accuracy (pooled over tasks)")
    ax.set_title("MC-SMoE and baselines (o merge/prune, ■ + C step, ★ + distillation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:  # noqa: PLR0915 - one linear experiment
    """Run the experiment (see the module docstring); the results written to ``<out>/results.json``."""
    args = _args(argv)
    import numpy as np

    from expertkit.fileio import write_atomic
    from expertkit.models import load_model
    from expertkit.tasks.paired import compare, compare_continuous, verdict
    from expertkit.tasks.perplexity import block_nll, heldout_blocks, perplexity

    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    if args.smoke:
        folder = smoke_moe(args.out / "moe") if not (args.out / "moe").is_dir() else args.out / "moe"
    elif args.moe is not None:
        folder = args.moe.absolute() if args.executor == "ray" else args.moe
    else:
        from expertkit.moe import MoeBuildConfig, build_moe

        folder = build_moe(MoeBuildConfig()).path  # reused from the cache (builds it when missing)
    from expertkit.moe.compress.api import calibration_tasks
    from expertkit.moe.compress.config import CompressConfig

    from expertkit.weights.fingerprint import model_digest

    tasks = list(args.tasks or calibration_tasks(CompressConfig(model=str(folder)), folder))
    original = load_model(folder)
    args.moe_digest = model_digest(original.model)  # every weight's bytes: cells are reused only for this MoE
    saved_results(args.out / "results.json", args.moe_digest)  # refuses another MoE's results
    run = calibrate_once(args, folder, tasks, original)
    n, disc = choose_n(run)
    print(f"MoE {folder}: {len(tasks)} tasks; validation pilot discordance {disc:.3f} -> n = {n} per task")
    blocks = heldout_blocks(run.original.tokenizer, n_blocks=args.blocks)  # (blocks, 128)
    buf = io.BytesIO()
    np.save(buf, blocks.numpy(), allow_pickle=False)
    write_atomic(args.out / "calibration" / "blocks.npy", buf.getvalue())
    executor = sweep_executor(args, ModelCache(), args.out)
    try:
        cells = run_sweep("mc_smoe", sweep(run, n), executor, args.out / "logs")
    finally:
        executor.close()
    systems: dict[str, System] = {}
    test = {"original": run.scores(None, "test", n)}
    nll = {"original": block_nll(run.original.model, blocks)}
    for cell in cells:
        for one in cell["systems"]:
            label = one["label"]
            systems[label] = (one["method"], one["experts"], one["keep"], one["share"], one["kd_lr"], Path(one["folder"]))
            run.records[label], test[label], nll[label] = one["record"], one["test"], one["nll"]

    orig = _pool(test["original"])
    rows, points, claims = [], [], {}
    for label, (m, e, keep, share, lr, path) in systems.items():
        rec = run.records[label]
        r = compare(_pool(test[label]), orig, seed=args.seed)
        ppl = compare_continuous([-x for x in nll[label]], [-x for x in nll["original"]], seed=args.seed)
        stage = "C-KD" if lr else ("C" if keep else "")
        points.append({"label": label, "method": m, "experts": e, "stage": stage, "accuracy": r.mean_a,
                       "params": rec["expert_parameters"]["after"]})
        rows.append({"label": label, "folder": str(path), "method": m, "experts": e, "lowrank_keep": keep, "sparse_share": share,
                     "kd_lr": lr, "experts_per_layer": rec["experts_per_layer"],
                     "expert_parameters": rec["expert_parameters"], "flops": rec["expert_flops_per_token"],
                     "accuracy": {t: _mean(v) for t, v in test[label].items()}, "vs_original": r.as_dict(),
                     "perplexity": perplexity(nll[label]), "nll_vs_original": ppl.as_dict()})
        if m != "msmoe" and f"msmoe-{label.split('-', 1)[1]}" in systems:
            claims[f"msmoe vs {label}"] = compare(_pool(test[f"msmoe-{label.split('-', 1)[1]}"]), _pool(test[label]),
                                                  seed=args.seed)
    pareto(points, _mean(orig), args.out / "pareto.png")

    lines = [f"n = {n} test examples per task x {len(tasks)} tasks (pooled n = {len(orig)}); original MoE "
             f"accuracy {_mean(orig):.3f}, perplexity {perplexity(nll['original']):.2f}.", "",
             "| system | experts/layer | expert params | removed | FLOPs removed | accuracy | vs original (p) | ppl |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        v, p = row["vs_original"], row["expert_parameters"]
        lines.append(f"| {row['label']} | {row['experts_per_layer']} | {p['after'] / 1e6:.1f}M | "
                     f"{100 * p['removed_share']:.0f}% | {100 * row['flops']['removed_share']:.0f}% | {v['mean_a']:.3f} | "
                     f"{v['diff']:+.3f} ({v['p_value']:.2g}) | {row['perplexity']:.2f} |")
    lines += ["", "Verdicts:", ""]
    by = {r["label"]: r for r in rows}
    first = args.experts[0]

    def result(label: str) -> Any:
        return compare(_pool(test[label]), orig, seed=args.seed)

    if f"msmoe-{first}" in by:
        lines.append("- " + within(f"M-SMoE 8 -> {first} loses at most 1 point without distillation", result(f"msmoe-{first}"), 0.01))
    for e in args.experts:
        if f"msmoe-{e}-C-KD" in by:
            removed = by[f"msmoe-{e}-C-KD"]["expert_parameters"]["removed_share"]
            lines.append("- " + within(f"MC-SMoE 8 -> {e} + C ({100 * removed:.0f}% of expert parameters removed) "
                                       "loses at most 3 points after distillation", result(f"msmoe-{e}-C-KD"), 0.03))
        if f"msmoe-{e}-C" in by:
            lines.append("- " + within(f"MC-SMoE 8 -> {e} + C without distillation: virtually no loss (1 point)",
                                       result(f"msmoe-{e}-C"), 0.01))
    for claim, r in claims.items():
        lines.append("- " + verdict(f"M-SMoE ahead of {claim.split(' vs ')[1]} at equal parameters", r))
    print("\n".join(lines))
    out = {"moe": str(folder), "moe_digest": args.moe_digest, "tasks": tasks, "n": n, "pilot_discordance": disc, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "systems": rows,
        "original": {"accuracy": {t: _mean(v) for t, v in test["original"].items()}, "perplexity": perplexity(nll["original"])},
        "claims": {k: v.as_dict() for k, v in claims.items()}, "minutes": (time.perf_counter() - began) / 60,
        "markdown": "\n".join(lines)}
    write_atomic(args.out / "results.json", json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
