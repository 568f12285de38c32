"""DP-Flat at small scale: does flatness close the gap between DP-SGD and non-private fine-tuning?

    .venv/bin/python experiments/dp_flat.py [--out runs/experiments/dp_flat] [--smoke]
        [--executor {local,ray}] [--address HOST:6379]

Task: BBC News topic classification (``bbc_topic``, a choice task, 5 topics) on SmolLM2-135M. Its train
split is cut once into a public part (``--n-public``: the distillation teacher and the choice of prefix
layers see only it) and a private part (``--n-private``: every DP student's data). Cells: ε in
``--epsilons`` (∞ = no noise, per-example clipping kept) × systems

* ``dpsgd``: DP-AdamW on LoRA;
* ``perturb``: + weight perturbation along the last privatised gradient (no extra privacy cost);
* ``sparse``: + flatness-guided sparse prefix tuning (prefix scheme; the ``--prefix-k`` flattest layers);
* ``distill``: + weight distillation from the non-DP teacher trained on the public part;
* ``dpflat``: all three (prefix scheme);

and one non-private reference (AdamW LoRA on the private part, no clipping, no noise). Each cell reports
test accuracy on the same ``--n`` examples (paired), ε spent (Opacus RDP), the top Hessian eigenvalue of
the trained weights, and the loss-threshold membership-inference AUC (private members vs test examples).

Claims checked (paired: exact McNemar, bootstrap interval): DP-Flat beats DP-SGD at each ε; DP-Flat at
ε = 3 is close to non-private (the paper's headline); DP-Flat closes at least half of the DP-SGD gap at
ε = 3 (the issue's goal); MIA AUC at most 0.55 at ε <= 8.

Why n = 300: with a quarter of pairs discordant, ``mcnemar_sample_size(0.07, 0.25)`` = 395 pairs detect
a 7-point difference; 300 (most of BBC's 426 test articles) detects about 8 points at power 0.8.

Writes ``<out>/results.json``, ``<out>/accuracy_vs_epsilon.png``, ``<out>/cells/*.json`` (one per cell
and one for the non-private reference: an interrupted run resumes) and prints the markdown for
docs/results.md. ``--smoke`` runs the whole script on a tiny random Llama and a toy task in about a
minute (a check of the script, not a result).

The cells are independent, so ``--executor ray`` runs them as Ray tasks (:mod:`expertkit.pipeline.sweep`;
per-cell logs in ``<out>/logs``); the default runs them one after the other in this process, in the order
above. What depends on the public part only (the two teachers, the prefix layers' sharpness) is made once
in ``<out>/models/shared`` and reused by every cell (on one machine; Ray workers elsewhere remake it).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from expertkit.pipeline.executor import ModelCache
from expertkit.pipeline.sweep import Cell, add_executor_args, run_sweep, sweep_executor

SYSTEMS = ("dpsgd", "perturb", "sparse", "distill", "dpflat")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="default: runs/experiments/dp_flat (smoke: a temp folder)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="bbc_topic")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--n", type=int, default=300, help="test examples scored (paired across cells)")
    p.add_argument("--n-public", type=int, default=200)
    p.add_argument("--n-private", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=16, help="expected (Poisson) batch size")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm")
    p.add_argument("--rho", type=float, default=0.05, help="weight perturbation radius")
    p.add_argument("--prefix-k", type=int, default=8, help="prefix layers kept by sparse prefix tuning")
    p.add_argument("--virtual-tokens", type=int, default=10)
    p.add_argument("--distill-weight", type=float, default=0.1)
    p.add_argument("--teacher-steps", type=int, default=40)
    p.add_argument("--mia-n", type=int, default=100)
    p.add_argument("--sharpness-iters", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, toy task, tiny n: checks the script")
    add_executor_args(p)
    a = p.parse_args(argv)
    if a.smoke:
        a.task, a.n, a.n_public, a.n_private, a.steps, a.batch, a.mia_n = "lo-hi", 12, 8, 24, 2, 4, 6
        a.delta, a.teacher_steps, a.prefix_k, a.virtual_tokens, a.sharpness_iters = 1e-3, 2, 1, 2, 2
        a.epsilons = [e for e in a.epsilons if e in (3.0, math.inf)] or a.epsilons
        a.out = a.out or Path(tempfile.mkdtemp(prefix="dp-flat-smoke-"))
    a.out = a.out or Path("runs/experiments/dp_flat")
    return a


def smoke_setup(out: Path) -> str:
    """A saved tiny random Llama and the toy lo-hi task registered for this process; the model folder."""
    from expertkit.models.tiny import saved_tiny
    from expertkit.tasks.toy import register_smoke_task

    register_smoke_task()
    return saved_tiny("llama", out / "tiny-llama")


def recipe_for(a: argparse.Namespace, system: str, epsilon: float) -> Any:
    """The :class:`PrivateRecipe` of one cell."""
    from expertkit.privacy.recipe import PrivateRecipe

    prefix = system in ("sparse", "dpflat")
    params: dict[str, Any] = {"epsilon": epsilon, "delta": a.delta, "max_grad_norm": a.clip}
    if system in ("perturb", "dpflat"):
        params["rho"] = a.rho
    train = {"scheme": "prefix" if prefix else "lora", "num_virtual_tokens": a.virtual_tokens, "steps": a.steps,
             "batch_size": a.batch, "lr": a.lr, "seed": a.seed, "save_every": 10, "optimizer": "dp-adamw",
             "optimizer_params": params}
    return PrivateRecipe(task=a.task, n_public=a.n_public, n_private=a.n_private, train=train,
                         teacher_steps=a.teacher_steps,
                         distill_weight=a.distill_weight if system in ("distill", "dpflat") else 0.0,
                         prefix_layers=a.prefix_k if prefix else 0, sharpness_iters=a.sharpness_iters,
                         eval_n=a.n, mia_n=a.mia_n)


def _identity(recipe: dict[str, Any]) -> dict[str, Any]:
    """A cell recipe less what its scheme does not read (``prefix_init`` outside prefix tuning), so that
    cells cached before that field existed are still recognised."""
    train = dict(recipe.get("train", {}))
    if train.get("scheme") != "prefix":
        train.pop("prefix_init", None)
    return {**recipe, "train": train}


def run_cell(loaded: Any, a: argparse.Namespace, system: str, epsilon: float) -> dict[str, Any]:
    """One cell, cached in ``<out>/cells/<system>-eps<ε>.json``."""
    from expertkit.fileio import write_atomic
    from expertkit.privacy.recipe import train_private

    label = f"{system}-eps{epsilon:g}"
    cache = a.out / "cells" / f"{label}.json"
    recipe = recipe_for(a, system, epsilon)
    _in_worker(a)
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if _identity(saved.get("recipe", {})) == _identity(recipe.model_dump(mode="json")):
            return saved
    started = time.perf_counter()
    res = train_private(loaded, recipe, a.out / "models" / label, shared=a.out / "models" / "shared")
    res.update(system=system, target_epsilon=epsilon, recipe=_identity(recipe.model_dump(mode="json")),
               wall_seconds=time.perf_counter() - started)
    write_atomic(cache, json.dumps(res, indent=1).encode())
    return res


def _in_worker(a: argparse.Namespace) -> None:
    """What a cell needs in a fresh process (a Ray worker): the smoke run's toy task."""
    if a.smoke:
        from expertkit.tasks.toy import register_smoke_task

        register_smoke_task()


def reference_settings(a: argparse.Namespace) -> dict[str, Any]:
    """What the non-private reference depends on (its cached result is reused only when they match)."""
    return {k: getattr(a, k) for k in ("task", "n_public", "n_private", "steps", "batch", "lr", "seed", "n", "mia_n")}


def reference_cell(loaded: Any, a: argparse.Namespace) -> dict[str, Any]:
    """:func:`nonprivate`, cached in ``<out>/cells/nonprivate.json``."""
    from expertkit.fileio import write_atomic

    _in_worker(a)
    res = {**nonprivate(loaded, a), "settings": reference_settings(a)}
    write_atomic(a.out / "cells" / "nonprivate.json", json.dumps(res, indent=1).encode())
    return res


def sweep(a: argparse.Namespace, model: str) -> list[Cell]:
    """Every cell in run order (ε outer, system inner), then the non-private reference."""
    cells = [Cell(f"{s}-eps{e:g}", run_cell, a.out / "cells" / f"{s}-eps{e:g}.json",
                  {"a": a, "system": s, "epsilon": e}, model,
                  {"recipe": _identity(recipe_for(a, s, e).model_dump(mode="json"))})
             for e in a.epsilons for s in a.systems]
    return [*cells, Cell("nonprivate", reference_cell, a.out / "cells" / "nonprivate.json", {"a": a}, model,
                         {"settings": reference_settings(a)})]


def nonprivate(loaded: Any, a: argparse.Namespace) -> dict[str, Any]:
    """The reference: AdamW LoRA on the private part, no clipping, no noise; scored on the same examples."""
    from expertkit.privacy.mia import loss_threshold_mia
    from expertkit.privacy.split import privacy_split
    from expertkit.tasks.base import get_task
    from expertkit.tasks.evaluate import evaluate
    from expertkit.train import train_lora

    task = get_task(a.task)
    split = privacy_split(task, a.n_public, a.n_private, a.seed)
    out = a.out / "models" / "nonprivate"
    train_lora(loaded, split.private, out, steps=a.steps, batch_size=a.batch, lr=a.lr, seed=a.seed,
               train_examples=a.n_private, save_every=10, optimizer_params={"max_grad_norm": None})
    ev = evaluate(loaded, None, task, split="test", n=a.n, seed=a.seed, adapter=out)
    test = task.examples("test", a.mia_n, a.seed + 1)
    mia = loss_threshold_mia(loaded.model, loaded.tokenizer, task, list(split.private_examples[: a.mia_n]), test,
                             adapter=out)
    return {"accuracy": ev.accuracy, "ci": [ev.ci_low, ev.ci_high], "scores": list(ev.scores), "mia": mia.as_dict()}


def teachers(loaded: Any, a: argparse.Namespace, cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The distillation teachers alone (non-DP, trained on the public part only, so no privacy cost) on the
    same test examples: a DP student is worth its privacy budget only if it beats its own teacher."""
    from expertkit.tasks.base import get_task
    from expertkit.tasks.evaluate import evaluate

    out: dict[str, dict[str, Any]] = {}
    for c in cells:
        folder = Path(c.get("teacher") or Path(c["student"]).parent / "teacher")  # older cells: per cell
        if c["recipe"].get("distill_weight", 0) > 0 and folder.is_dir():
            ev = evaluate(loaded, None, get_task(a.task), split="test", n=a.n, seed=a.seed, adapter=folder)
            out[c["system"]] = {"accuracy": ev.accuracy, "ci": [ev.ci_low, ev.ci_high], "scores": list(ev.scores),
                                "scheme": c["recipe"]["train"]["scheme"], "folder": str(folder)}
    return out


def plot(cells: list[dict[str, Any]], ref: dict[str, Any], epsilons: list[float], path: Path) -> None:
    """Accuracy against ε, one line per system, the non-private reference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(epsilons)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for system in dict.fromkeys(c["system"] for c in cells):
        acc = {c["target_epsilon"]: c["accuracy"] for c in cells if c["system"] == system}
        ax.plot(xs, [acc.get(e, float("nan")) for e in epsilons], marker="o", label=system)
    ax.axhline(ref["accuracy"], linestyle="--", color="gray", label="non-private")
    ax.set_xticks(xs, ["∞" if math.isinf(e) else f"{e:g}" for e in epsilons])
    ax.set_xlabel("target ε (δ fixed)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def claims(cells: list[dict[str, Any]], ref: dict[str, Any], seed: int,
           teacher: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """One verdict line per claim (paired tests on the same test examples)."""
    from expertkit.tasks.paired import compare, verdict

    at = {(c["system"], c["target_epsilon"]): c for c in cells}
    lines = []
    for eps in sorted({c["target_epsilon"] for c in cells}):
        if ("dpflat", eps) in at and ("dpsgd", eps) in at:
            r = compare(at["dpflat", eps]["scores"], at["dpsgd", eps]["scores"], seed=seed)
            lines.append(verdict(f"DP-Flat beats DP-SGD LoRA at ε = {eps:g}", r))
        for part, name in (("perturb", "weight perturbation"), ("sparse", "sparse prefix tuning"),
                           ("distill", "distillation")):  # each part alone: which one carries the effect
            if (part, eps) in at and ("dpsgd", eps) in at:
                r = compare(at[part, eps]["scores"], at["dpsgd", eps]["scores"], seed=seed)
                lines.append(verdict(f"DP-SGD LoRA + {name} beats DP-SGD LoRA at ε = {eps:g}", r))
    if ("dpflat", 3.0) in at:
        r = compare(at["dpflat", 3.0]["scores"], ref["scores"], seed=seed)
        lines.append(verdict("DP-Flat at ε = 3 is below non-private fine-tuning (the paper: 'similar')", r,
                             expect="a<b"))
        if ("dpsgd", 3.0) in at:
            gap = ref["accuracy"] - at["dpsgd", 3.0]["accuracy"]
            closed = (at["dpflat", 3.0]["accuracy"] - at["dpsgd", 3.0]["accuracy"]) / gap if gap > 0 else float("nan")
            lines.append(f"Share of the DP-SGD gap closed by DP-Flat at ε = 3: {closed:.2f} (goal >= 0.5; "
                         f"DP-SGD {at['dpsgd', 3.0]['accuracy']:.3f}, DP-Flat {at['dpflat', 3.0]['accuracy']:.3f}, "
                         f"non-private {ref['accuracy']:.3f}).")
    for system, t in (teacher or {}).items():
        for eps in sorted({c["target_epsilon"] for c in cells}):
            if (system, eps) in at:
                r = compare(at[system, eps]["scores"], t["scores"], seed=seed)
                lines.append(verdict(f"the DP student ({system}, ε = {eps:g}) beats its public-only teacher "
                                     f"({t['scheme']}, {t['accuracy']:.3f})", r))
    worst = max((c["mia"]["auc"] for c in cells if c["target_epsilon"] <= 8), default=float("nan"))
    lines.append(f"Largest membership-inference AUC at ε <= 8: {worst:.3f} (goal <= 0.55); "
                 f"non-private: {ref['mia']['auc']:.3f}.")
    return lines


def markdown(cells: list[dict[str, Any]], ref: dict[str, Any], a: argparse.Namespace, lines: list[str],
             teacher: dict[str, dict[str, Any]] | None = None) -> str:
    """The docs/results.md section."""
    out = ["| system | target ε | ε spent | accuracy [95% CI] | top Hessian eigenvalue | MIA AUC |",
           "|---|---:|---:|---:|---:|---:|"]
    for c in cells:
        out.append(f"| {c['system']} | {c['target_epsilon']:g} | {c['epsilon']:.3g} | {c['accuracy']:.3f} "
                   f"[{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] | {c['top_eigenvalue']:.4g} | {c['mia']['auc']:.3f} |")
    out.append(f"| non-private | - | ∞ | {ref['accuracy']:.3f} [{ref['ci'][0]:.3f}, {ref['ci'][1]:.3f}] | - | "
               f"{ref['mia']['auc']:.3f} |")
    for system, t in (teacher or {}).items():
        out.append(f"| teacher of {system} ({t['scheme']}, public part only, non-private) | - | 0 (public data) | "
                   f"{t['accuracy']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] | - | - |")
    out += ["", f"{a.task}, n = {a.n} test examples (paired), {a.n_private} private / {a.n_public} public training "
            f"examples, {a.steps} steps, expected batch {a.batch}, δ = {a.delta:g}, clipping {a.clip:g}.", ""]
    out += [f"- {line}" for line in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every cell (resumably), the paired claims, the plot; return the results."""
    from expertkit.fileio import write_atomic
    from expertkit.pipeline.executor import model_source

    a = _args(argv)
    if a.executor == "ray":
        a.out = a.out.absolute()  # the workers' working folder may differ from this one
    a.out.mkdir(parents=True, exist_ok=True)
    model = model_source(smoke_setup(a.out) if a.smoke else a.model)
    models = ModelCache(model)  # local: loaded once, by the first cell that runs; shared with the teachers below
    executor = sweep_executor(a, models, a.out)
    try:
        *cells, ref = run_sweep("dp_flat", sweep(a, model), executor, a.out / "logs")
    finally:
        executor.close()
    distilled = any(c["recipe"]["distill_weight"] > 0 for c in cells)  # else no teacher (and no model needed here)
    teacher = teachers(models.get(model), a, cells) if distilled else {}
    lines = claims(cells, ref, a.seed, teacher)
    plot(cells, ref, a.epsilons, a.out / "accuracy_vs_epsilon.png")
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
               "cells": cells, "nonprivate": ref, "teachers": teacher, "claims": lines}
    write_atomic(a.out / "results.json", json.dumps(results, indent=1).encode())
    print(markdown(cells, ref, a, lines, teacher))
    return results


if __name__ == "__main__":
    main()
