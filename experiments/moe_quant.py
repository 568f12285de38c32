"""MoE PTQ at small scale: at equal average bits, does structure-aware mixed precision beat uniform GPTQ?

    .venv/bin/python experiments/moe_quant.py [--moe PATH] [--bits 2.5 3 3.5 4] [--out runs/experiments/moe_quant]
    .venv/bin/python experiments/moe_quant.py --smoke      # a tiny random Mixtral: checks the script end to end

The paper (Li et al. 2024, "Examining post-training quantization for mixture-of-experts") finds that
bits spent by structure (attention over experts, frequently routed experts, the first layers, the
linears with weight outliers, the blocks that change the hidden state most) beat the same bits spent
uniformly. Here, on the Branch-Train-MiX MoE built from SmolLM2-135M (``expertkit moe build``'s
default recipe; never built by this script: build it first):

1. One calibration pass over the unquantized MoE (BBC validation text, the first ``calib_blocks``
   blocks, plus validation prompts of every cluster task; every expert's Hessian sees at least
   ``min_tokens`` tokens); its Hessians are reused by every GPTQ model below.
2. Systems: the unquantized MoE; RTN and GPTQ at uniform 2, 3, 4 bits; and at every average bit
   point (``--bits``, code bits; scales add ``16 / group`` bits to every system alike) GPTQ under each
   budgeted policy: ``random`` (structure-blind priorities: the control at equal bits), ``block``
   (attention), ``expert_frequency``, ``linear_kind`` (down), ``layer_position`` (the first 4 layers),
   ``outlier`` and ``block_importance`` (predicted, the paper's scorer).
3. Selection on validation only: the structure-aware policy with the lowest perplexity on BBC
   validation blocks *disjoint from the calibration blocks* at 3 bits is "mixed"; test data is
   never used to choose.
4. Test: per-block NLL on BBC test blocks for every system (paired Wilcoxon), and accuracy on the
   same test examples of ``--tasks`` for the dense base (reference), the unquantized MoE, RTN-3,
   GPTQ-3 and mixed-3 (exact McNemar). n per task: at least 300, and enough on the mix for ``mcnemar_sample_size(0.05, 0.2)``
   (a 5-point difference with a fifth of pairs discordant, alpha 0.05, power 0.8).
5. Claims with verdicts: mixed-3 beats GPTQ-3 (perplexity, accuracy); mixed-3 closes >= 30% of the
   perplexity gap between GPTQ-3 and the unquantized MoE (bootstrap interval over test blocks);
   GPTQ-3 beats RTN-3; and per policy, whether it beats ``random`` at equal bits (which structures
   deserve the bits).

Writes ``<out>/results.json`` (updated after every system, so an interrupted run resumes),
``<out>/perplexity.png``, ``<out>/bits.png`` and prints the markdown for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

POLICIES = {
    "random": {"kind": "random"},
    "block:attention": {"kind": "block", "favour": ["attention"]},
    "expert_frequency": {"kind": "expert_frequency", "favour": "frequent"},
    "linear_kind:down": {"kind": "linear_kind", "favour": "down"},
    "layer_position:first": {"kind": "layer_position", "favour": "first"},
    "outlier": {"kind": "outlier"},
    "block_importance": {"kind": "block_importance", "predicted": True},
}
TASKS = ("add_sub", "gcd", "leap_year", "syllogism")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moe", type=Path, help="MoE folder (default: the default recipe's cached build)")
    p.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0], help="average code bits")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--n", type=int, default=0, help="test examples per task (0: from mcnemar_sample_size, >= 300)")
    p.add_argument("--group", type=int, default=64, help="group size (64 divides SmolLM2's 576 and 1536)")
    p.add_argument("--calib-blocks", type=int, default=32)
    p.add_argument("--prompts", type=int, default=16, help="calibration prompts per cluster task")
    p.add_argument("--min-tokens", type=int, default=128, help="calibration tokens every expert sees at least")
    p.add_argument("--val-blocks", type=int, default=32, help="validation blocks for selection")
    p.add_argument("--test-blocks", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/experiments/moe_quant"))
    p.add_argument("--smoke", action="store_true", help="tiny random Mixtral, tiny n: checks the script runs")
    args = p.parse_args()
    if args.smoke:
        args.bits, args.group, args.calib_blocks, args.prompts = [2.5, 3.0], 32, 2, 2
        args.val_blocks, args.test_blocks, args.n, args.tasks = 4, 6, 3, ["add_sub", "gcd"]
        args.out = args.out.with_name(args.out.name + "_smoke")
    return args


def _moe_folder(args: argparse.Namespace, tmp: Path) -> tuple[Path, list[str]]:
    """The MoE to quantize and its cluster tasks; refuses to start a build."""
    from expertkit.moe import MoeBuildConfig

    recipe = MoeBuildConfig()
    tasks = [t for c in recipe.clusters for t in c.tasks]
    if args.smoke:
        from expertkit.models.tiny import save_tiny

        return save_tiny("mixtral", tmp / "tiny-moe", seed=args.seed), args.tasks
    if args.moe is not None:
        return args.moe, tasks
    from expertkit.moe.build import cached_build

    folder = cached_build(recipe)
    if folder is None:
        raise SystemExit("no finished MoE of the default recipe in the cache; run `expertkit moe build` first "
                         "(this script never builds).")
    return folder, tasks


def _config(moe: Path, args: argparse.Namespace, method: str, policy: dict) -> object:
    from expertkit.quant.config import QuantizeConfig

    return QuantizeConfig.model_validate({"model": str(moe), "method": method, "group_size": args.group,
                                          "policy": policy, "calibration": {"min_tokens_per_expert": args.min_tokens}})


def _systems(args: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    """``{name: (method, policy)}`` of every quantized system."""
    out: dict[str, tuple[str, dict]] = {}
    for b in (2, 3, 4):
        out[f"rtn-{b}"] = ("rtn", {"kind": "uniform", "bits": b})
        out[f"gptq-{b}"] = ("gptq", {"kind": "uniform", "bits": b})
    scale = 16 / args.group  # float16 scale per group, the same for every system
    for bits in args.bits:
        for name in args.policies:
            out[f"{name}@{bits:g}"] = ("gptq", {**POLICIES[name], "target_bits": bits + scale, "choices": [2, 3, 4]})
    return out


def main() -> None:  # noqa: PLR0915 - one linear experiment
    args = _args()
    import numpy as np

    from expertkit.models import load_model
    from expertkit.quant.calibrate import calibrate
    from expertkit.quant.data import calibration_batches
    from expertkit.quant.targets import find_targets
    from expertkit.tasks.perplexity import block_nll, heldout_blocks

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        moe, cluster_tasks = _moe_folder(args, Path(tmp))
        loaded = load_model(str(moe))
        tok = loaded.tokenizer
        held = heldout_blocks(tok, split="validation", n_blocks=args.calib_blocks + args.val_blocks)
        val_blocks = held[args.calib_blocks:]  # (V, 128): after the calibration blocks, never seen by it
        test_blocks = heldout_blocks(tok, split="test", n_blocks=args.test_blocks)
        batches = calibration_batches(tok, text_blocks=args.calib_blocks, tasks=cluster_tasks,
                                      prompts_per_task=args.prompts, split="validation", seed=args.seed)
        t0 = time.perf_counter()
        hessians = calibrate(loaded.model, batches, find_targets(loaded.model), min_tokens_per_expert=args.min_tokens)
        results["calibration_seconds"] = round(time.perf_counter() - t0, 1)

        def record(name: str, model_loaded, extra: dict) -> None:
            results["systems"][name] = {**extra, "val_nll": block_nll(model_loaded.model, val_blocks),
                                        "test_nll": block_nll(model_loaded.model, test_blocks)}
            path.write_text(json.dumps(results, indent=1) + "\n")

        if "fp" not in results["systems"]:
            record("fp", loaded, {"bits": 16.0})
        base = None if args.smoke else load_model(_base_name())  # the dense base, as a reference
        if base is not None and "dense-base" not in results["systems"]:
            record("dense-base", base, {"bits": 16.0})
        for name, (method, policy) in _systems(args).items():
            if name in results["systems"]:
                continue  # resumed
            t0 = time.perf_counter()
            res = _quantize(moe, args, method, policy, hessians, batches)
            rep = res.report()
            extra = {"method": method, "policy": policy, "bits": rep["bits"]["achieved_bits"],
                     "code_bits": rep["bits"]["code_bits"], "by_structure": rep["bits_by_structure"],
                     "seconds": round(time.perf_counter() - t0, 1)}
            record(name, res.loaded, extra)
            print(f"{name}: {extra['bits']:.4f} bits, test ppl {_ppl(results['systems'][name]['test_nll']):.3f}")
            del res
        mixed = _choose(args, results["systems"])
        results["selected"] = mixed
        acc = {"fp": _accuracy(args, loaded, cache=True)}
        if base is not None:
            acc["dense-base"] = _accuracy(args, base, cache=True)
        del loaded, base
        for name in ("rtn-3", "gptq-3", mixed):  # one quantized model in memory at a time
            sysinfo = results["systems"][name]
            res = _quantize(moe, args, sysinfo["method"], sysinfo["policy"], hessians, batches)
            acc[name] = _accuracy(args, res.loaded, cache=False)
            del res
        _report(args, results, acc, np)
        path.write_text(json.dumps(results, indent=1) + "\n")


def _base_name() -> str:
    from expertkit.moe import MoeBuildConfig

    return MoeBuildConfig().base


def _quantize(moe: Path, args: argparse.Namespace, method: str, policy: dict, hessians, batches):
    """Quantize a fresh copy of the MoE from the shared Hessians (deterministic: the same system twice is
    the same model)."""
    from expertkit.models import load_model
    from expertkit.quant.run import quantize_model

    return quantize_model(_config(moe, args, method, policy), load_model(str(moe)), calibration=hessians,
                          batches=batches)


def _ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def _choose(args: argparse.Namespace, systems: dict) -> str:
    """The structure-aware policy at 3 bits with the lowest *validation* perplexity."""
    cands = [f"{p}@3" for p in args.policies if p != "random" and f"{p}@3" in systems]
    if not cands:
        raise SystemExit("selection needs 3.0 in --bits and at least one structure-aware policy.")
    return min(cands, key=lambda n: _ppl(systems[n]["val_nll"]))


def _accuracy(args: argparse.Namespace, loaded, *, cache: bool) -> list[float]:
    """Per-example test scores on ``args.tasks``: the same examples for every system."""
    from expertkit.models.bundled import cache_root
    from expertkit.tasks.evaluate import evaluate
    from expertkit.tasks.paired import mcnemar_sample_size

    need = mcnemar_sample_size(0.05, 0.2)
    n = args.n or max(300, math.ceil(need / len(args.tasks)))
    where = cache_root() / "eval" if cache and not args.smoke else None  # quantized weights: not cached
    return [s for t in args.tasks for s in evaluate(loaded, None, t, split="test", n=n, seed=args.seed, batch_size=64,
                                                      cache_dir=where).scores]


def _report(args: argparse.Namespace, results: dict, acc: dict[str, list[float]], np) -> None:
    from expertkit.tasks.paired import compare, compare_continuous, verdict

    systems, mixed = results["systems"], results["selected"]
    test = {k: np.array(v["test_nll"]) for k, v in systems.items()}
    lines = [f"Selected on validation: `{mixed}` ({systems[mixed]['bits']:.4f} bits with scales).", ""]
    c = compare_continuous(test["gptq-3"], test[mixed], seed=args.seed)
    lines.append("- " + verdict(f"{mixed} has lower test NLL than uniform GPTQ-3", c, test="Wilcoxon"))
    c = compare(acc[mixed], acc["gptq-3"], seed=args.seed)
    lines.append("- " + verdict(f"{mixed} is more accurate than GPTQ-3 on {', '.join(args.tasks)}", c))
    c = compare(acc["gptq-3"], acc["rtn-3"], seed=args.seed)
    lines.append("- " + verdict("GPTQ-3 is more accurate than RTN-3", c))
    c = compare_continuous(test["rtn-3"], test["gptq-3"], seed=args.seed)
    lines.append("- " + verdict("GPTQ-3 has lower test NLL than RTN-3", c, test="Wilcoxon"))
    closed, lo, hi = _gap_closed(test["fp"], test["gptq-3"], test[mixed], np, args.seed)
    word = "supported" if lo >= 0.3 else ("contradicted" if hi < 0.3 else "not shown")
    lines.append(f"- {mixed} closes >= 30% of the perplexity gap between GPTQ-3 and the unquantized MoE: {word}; "
                 f"closed {closed:.1%} [{lo:.1%}, {hi:.1%}] (95% paired bootstrap over {len(test['fp'])} test blocks).")
    lines += ["", "Which structures deserve the bits (each policy against `random` priorities at equal bits, test NLL):"]
    for bits in args.bits:
        for name in args.policies:
            key, ref = f"{name}@{bits:g}", f"random@{bits:g}"
            if name != "random" and key in test and ref in test:
                c = compare_continuous(test[ref], test[key], seed=args.seed)
                lines.append("- " + verdict(f"{key} beats random@{bits:g}", c, test="Wilcoxon"))
    results["accuracy"] = {k: float(np.mean(v)) for k, v in acc.items()}
    results["gap_closed"] = [closed, lo, hi]
    results["verdicts"] = lines
    table = ["| system | bits (with scales) | val ppl | test ppl | accuracy |", "|---|---:|---:|---:|---:|"]
    for k, v in systems.items():
        a = f"{results['accuracy'][k]:.3f}" if k in results["accuracy"] else ""
        table.append(f"| {k} | {v['bits']:.3f} | {_ppl(v['val_nll']):.3f} | {_ppl(v['test_nll']):.3f} | {a} |")
    _plots(args, systems, mixed)
    print("\n".join(table + [""] + lines))


def _gap_closed(fp, uniform, mixed, np, seed: int, resamples: int = 5000) -> tuple[float, float, float]:
    """Share of the perplexity gap ``ppl(uniform) - ppl(fp)`` that ``mixed`` closes, and a 95% paired
    bootstrap interval (test blocks resampled together for the three systems)."""
    def closed(idx):
        f, u, m = (math.exp(x[idx].mean()) for x in (fp, uniform, mixed))
        return (u - m) / (u - f) if u != f else float("nan")

    rng = np.random.default_rng(seed)
    n = len(fp)
    boot = np.array([closed(rng.integers(0, n, n)) for _ in range(resamples)])
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    return closed(np.arange(n)), float(lo), float(hi)


def _plots(args, systems: dict, mixed: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in args.policies:
        pts = sorted((v["bits"], _ppl(v["test_nll"])) for k, v in systems.items() if k.startswith(f"{name}@"))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    for method in ("gptq", "rtn"):
        pts = sorted((v["bits"], _ppl(v["test_nll"])) for k, v in systems.items() if k.startswith(f"{method}-"))
        ax.plot(*zip(*pts, strict=True), marker="s", linestyle="--", label=f"{method} uniform")
    ax.axhline(_ppl(systems["fp"]["test_nll"]), color="k", linewidth=0.8, label="unquantized")
    ax.set(xlabel="average bits per quantized weight (scales counted)", ylabel="test perplexity (BBC)", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "perplexity.png", dpi=120)
    by = systems[mixed]["by_structure"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = list(by["group"]) + [f"{k} (kind)" for k in by["kind"]]
    ax.bar(labels, [c["bits"] for c in by["group"].values()] + [c["bits"] for c in by["kind"].values()])
    ax.set(ylabel="mean code bits", title=f"{mixed}: bits by structure")
    fig.tight_layout()
    fig.savefig(args.out / "bits.png", dpi=120)
    plt.close("all")


if __name__ == "__main__":
    main()
