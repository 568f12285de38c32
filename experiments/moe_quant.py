"""MoE PTQ at small scale: at equal average bits, does structure-aware mixed precision beat uniform GPTQ?

    .venv/bin/python experiments/moe_quant.py [--moe PATH] [--bits 2.5 3 3.5 4] [--out runs/experiments/moe_quant]
    .venv/bin/python experiments/moe_quant.py --smoke      # a tiny random Mixtral: checks the script end to end
    .venv/bin/python experiments/moe_quant.py --executor ray [--address HOST:6379]   # the systems as Ray tasks
    PY=/path/to/peers-venv/bin/python; $PY experiments/moe_quant.py --bits 3 --auto-round   # + auto-round-3
    .venv/bin/python experiments/moe_quant.py --clip-grid 20 --out runs/experiments/moe_quant_clip  # clipped scales
    .venv/bin/python experiments/moe_quant.py --clip-grid 20 --sequential --out ...  # + sequential GPTQ-3 and mix

``--sequential`` adds GPTQ-3 and the 3-bit mix chosen on validation quantized *sequentially*
(``layers_per_pass: 1``: each layer's Hessians gathered through the earlier layers already quantized,
so the error of the earlier layers is fed forward; on the dense model this cut 3-bit GPTQ's perplexity
by 21%, docs/benchmarks.md), each one cell with its accuracy, and the same claims between them: does
the allocation still pay on top of the better quantizer? These Hessians depend on the allocation, so
neither the shared Hessians nor the code store apply: each is a full sequential GPTQ run.

``--auto-round`` adds the peer the issue names, auto-round's uniform 3-bit (SignRound, 200 tuning
iterations per block by default) at equal bits, in a venv with the ``peers`` extra
(``pip install -e '.[peers]'``: auto-round 0.16.1 installs beside our pins); it is one cell that also
scores the test examples, and it adds two verdicts: the mix against auto-round-3 on test NLL and accuracy.

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
   budgeted policy (widths from :func:`choices`: 2-4 bits at 2.5 and 3, 3-5 at 3.5 and 4): ``random``
   (structure-blind priorities: the control at equal bits), ``block`` (attention), ``expert_frequency``,
   ``linear_kind`` (down), ``layer_position`` (the first 4 layers), ``outlier`` and ``block_importance`` (predicted, the paper's scorer).
3. Selection on validation only: the structure-aware policy with the lowest perplexity on BBC
   validation blocks *disjoint from the calibration blocks* at 3 bits is "mixed"; test data is
   never used to choose.
4. Test: per-block NLL on BBC test blocks for every system (paired Wilcoxon), and accuracy on the
   same test examples of ``--tasks`` for the dense base (reference), the unquantized MoE, RTN-3,
   GPTQ-3 and mixed-3, and at every other bit point for the policy chosen on validation there and its
   reference (uniform GPTQ at integer points, else ``random``) (exact McNemar). n per task: at least
   300, and enough on the mix for ``mcnemar_sample_size(0.05, 0.2)`` (a 5-point difference with a
   fifth of pairs discordant, alpha 0.05, power 0.8).
5. Claims with verdicts: mixed-3 beats GPTQ-3 (perplexity, accuracy); mixed-3 closes >= 30% of the
   perplexity gap between GPTQ-3 and the unquantized MoE (bootstrap interval over test blocks);
   GPTQ-3 beats RTN-3; and per policy, whether it beats ``random`` at equal bits (which structures
   deserve the bits).

Writes ``<out>/results.json``, ``<out>/perplexity.png``, ``<out>/bits.png`` and prints the markdown
for docs/results.md.

Every quantized system (step 2) and every accuracy of a quantized model (step 4) is a cell of a sweep
(:mod:`expertkit.pipeline.sweep`): ``--executor ray`` runs them as Ray tasks (per-cell logs in
``<out>/logs``), the default one after the other in this process, in the order above. The driver
calibrates once (step 1) and saves what the cells share under ``<out>/state/``: the Hessians
(``hessians.safetensors``, :meth:`~expertkit.quant.calibrate.Calibration.save`) and the calibration
batches and validation/test blocks (``data.safetensors``); each cell reads them and quantizes a fresh
copy of the MoE, so a cell gives the same model in any process. A cell writes
``<out>/cells/<system>.json`` (``acc-<system>.json`` for an accuracy): an interrupted run resumes from
them (and from the systems of a ``results.json`` written before the cells existed).

Every (matrix, bits) is solved by GPTQ once per run: the cells share ``<out>/state/codes/<Hessians
digest>`` (:class:`~expertkit.quant.codestore.CodeStore`, int8 codes; measured on the bundled MoE: 684 MB
per bit-width, 2.6 GB for 2 to 5 bits). A matrix's GPTQ codes depend on its Hessian (from the
unquantized MoE) and its bits, not on the policy, so once a width's matrices are solved (GPTQ-3: 246 s
on 2 cores with ``--clip-grid 20``) every system that uses them reads them; a cell's ``seconds`` is then
mostly reading. RTN (about 45 s per system) is not kept: it is cheaper to round again than to store.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from expertkit.pipeline.executor import ModelCache
from expertkit.pipeline.sweep import Cell, add_executor_args, run_sweep, saved_results, sweep_executor

POLICIES = {
    "random": {"kind": "random"},
    "block:attention": {"kind": "block", "favour": ["attention"]},
    "expert_frequency": {"kind": "expert_frequency", "favour": "frequent"},
    "linear_kind:down": {"kind": "linear_kind", "favour": "down"},
    "layer_position:first": {"kind": "layer_position", "favour": "first"},
    "outlier": {"kind": "outlier"},
    "block_importance": {"kind": "block_importance", "predicted": True},
}
# next_number replaces session 11's leap_year, which the MoE, the base and RTN-3 answered with its majority class
# (docs/results.md): the accuracy cells of a rerun are new, the perplexity cells are reused
TASKS = ("add_sub", "gcd", "next_number", "syllogism")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moe", type=Path, help="MoE folder (default: the default recipe's cached build)")
    p.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0], help="average code bits")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--uniform-bits", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4],
                   help="bits of the uniform RTN and GPTQ systems (3 is needed: the claims compare at 3 bits)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--n", type=int, default=0, help="test examples per task (0: from mcnemar_sample_size, >= 300)")
    p.add_argument("--group", type=int, default=64, help="group size (64 divides SmolLM2's 576 and 1536)")
    p.add_argument("--clip-grid", type=int, default=0,
                   help="the scales' clipping search for RTN and GPTQ (QuantizeConfig.clip_grid; 0: full range, "
                        "as the committed cells)")
    p.add_argument("--calib-blocks", type=int, default=32)
    p.add_argument("--prompts", type=int, default=16, help="calibration prompts per cluster task")
    p.add_argument("--min-tokens", type=int, default=128, help="calibration tokens every expert sees at least")
    p.add_argument("--val-blocks", type=int, default=32, help="validation blocks for selection")
    p.add_argument("--test-blocks", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auto-round", action="store_true",
                   help="add auto-round's uniform 3-bit (SignRound; the peer, from the `peers` extra) at equal bits")
    p.add_argument("--ar-iters", type=int, default=200, help="auto-round's tuning iterations per block (its default 200)")
    p.add_argument("--sequential", action="store_true",
                   help="add GPTQ-3 and the 3-bit mix chosen on validation quantized sequentially (layers_per_pass 1: "
                        "each layer's Hessians gathered through the already quantized earlier layers)")
    p.add_argument("--out", type=Path, default=Path("runs/experiments/moe_quant"))
    p.add_argument("--smoke", action="store_true", help="tiny random Mixtral, tiny n: checks the script runs")
    add_executor_args(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.bits, args.group, args.calib_blocks, args.prompts = [b for b in args.bits if b in (2.5, 3.0)] or [3.0], 32, 2, 2
        args.val_blocks, args.test_blocks, args.n, args.tasks = 4, 6, 3, ["add_sub", "gcd"]
        args.out = args.out.with_name(args.out.name + "_smoke")
    if 3 not in args.uniform_bits:
        p.error("--uniform-bits must hold 3: the claims compare RTN-3, GPTQ-3 and the mix at 3 bits.")
    if args.executor == "ray":
        args.out = args.out.absolute()  # the workers' working folder may differ from this one
    return args


def _moe_folder(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The MoE to quantize (absolute) and its cluster tasks; refuses to start a build."""
    from expertkit.moe import MoeBuildConfig

    recipe = MoeBuildConfig()
    tasks = [t for c in recipe.clusters for t in c.tasks]
    if args.smoke:  # in the output folder, where Ray's workers see it too
        from expertkit.models.tiny import save_tiny

        folder = args.out / "tiny-moe"
        if not (folder / "config.json").is_file():
            save_tiny("mixtral", folder, seed=args.seed)
        return folder.absolute(), args.tasks
    if args.moe is not None:
        return args.moe.absolute(), tasks
    from expertkit.moe.build import cached_build

    folder = cached_build(recipe)
    if folder is None:
        raise SystemExit("no finished MoE of the default recipe in the cache; run `expertkit moe build` first "
                         "(this script never builds).")
    return folder, tasks


def _config(moe: Path, args: argparse.Namespace, method: str, policy: dict, layers_per_pass: int = 0) -> object:
    from expertkit.quant.config import QuantizeConfig

    return QuantizeConfig.model_validate({"model": str(moe), "method": method, "group_size": args.group,
                                          "clip_grid": args.clip_grid, "policy": policy,
                                          "calibration": {"min_tokens_per_expert": args.min_tokens,
                                                          "layers_per_pass": layers_per_pass}})


def _systems(args: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    """``{name: (method, policy)}`` of every quantized system."""
    out: dict[str, tuple[str, dict]] = {}
    for b in args.uniform_bits:
        out[f"rtn-{b}"] = ("rtn", {"kind": "uniform", "bits": b})
        out[f"gptq-{b}"] = ("gptq", {"kind": "uniform", "bits": b})
    scale = 16 / args.group  # float16 scale per group, the same for every system
    for bits in args.bits:
        for name in args.policies:
            out[f"{name}@{bits:g}"] = ("gptq", {**POLICIES[name], "target_bits": bits + scale, "choices": choices(bits)})
    return out


def choices(bits: float) -> list[int]:
    """The widths a budgeted policy picks from at an average of ``bits`` code bits: one bit either side of
    ``bits`` rounded up (2.5 and 3 -> 2, 3, 4; 3.5 and 4 -> 3, 4, 5), so that every point leaves room to
    move bits both ways (at 4 with {2, 3, 4} every matrix would be at 4: uniform GPTQ-4 again)."""
    top = math.ceil(bits)
    return [b for b in (top - 1, top, top + 1) if b >= 2]


def main(argv: list[str] | None = None) -> dict[str, Any]:  # noqa: PLR0915 - one linear experiment
    """Run the experiment (see the module docstring); the results written to ``<out>/results.json``."""
    args = _args(argv)
    import numpy as np

    from expertkit.fileio import sha256_file, write_atomic
    from expertkit.models import load_model
    from expertkit.tasks.perplexity import block_nll
    from expertkit.weights.fingerprint import model_digest

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    moe, cluster_tasks = _moe_folder(args)
    loaded = load_model(str(moe))
    args.moe_digest = model_digest(loaded.model)  # every weight's bytes: results are reused only for this MoE
    results = saved_results(path, args.moe_digest) or {"systems": {}}  # refuses another MoE's results
    results["moe_digest"] = args.moe_digest
    state, val_blocks, test_blocks = _calibrate_once(args, loaded, cluster_tasks, results)
    args.hessians_digest = sha256_file(state / "hessians.safetensors")[:16]  # names the cells' code store

    def record(name: str, model_loaded: Any, extra: dict) -> None:
        results["systems"][name] = {**extra, "val_nll": block_nll(model_loaded.model, val_blocks),
                                    "test_nll": block_nll(model_loaded.model, test_blocks)}
        write_atomic(path, json.dumps(results, indent=1) + "\n")

    if "fp" not in results["systems"]:
        record("fp", loaded, {"bits": 16.0})
    base = None if args.smoke else load_model(_base_name())  # the dense base, as a reference
    if base is not None and "dense-base" not in results["systems"]:
        record("dense-base", base, {"bits": 16.0})
    todo = {k: v for k, v in _systems(args).items() if k not in results["systems"]}  # the others: resumed
    executor = sweep_executor(args, ModelCache(), args.out)
    try:
        cells = [Cell(name, system_cell, _cell_file(args, name), {
            "args": args, "moe": moe, "state": state, "name": name, "method": method, "policy": policy,
            "result": _cell_file(args, name)}, match=_identity(args, name, method, policy))
                 for name, (method, policy) in todo.items()]
        for cell, row in zip(cells, run_sweep("moe_quant", cells, executor, args.out / "logs"), strict=True):
            results["systems"][cell.key] = row["system"]
        write_atomic(path, json.dumps(results, indent=1) + "\n")
        if args.auto_round:  # the peer at uniform 3 bits; its cell scores the test examples too
            key = "auto-round-3"
            cell = Cell(key, autoround_cell, _cell_file(args, key), {
                "args": args, "moe": moe, "state": state, "name": key, "bits": 3, "result": _cell_file(args, key)},
                match=_identity(args, key, "auto-round", {"bits": 3, "iters": args.ar_iters}, accuracy=True))
            row = run_sweep("moe_quant auto-round", [cell], executor, args.out / "logs")[0]
            results["systems"][key] = row["system"]
            ar_scores = row["scores"]
            write_atomic(path, json.dumps(results, indent=1) + "\n")
        mixed = _choose(args, results["systems"])
        results["selected"] = mixed
        seq_scores = {}
        if args.sequential:  # GPTQ-3 and the chosen mix, each layer's Hessians through the quantized earlier ones
            todo_seq = {f"{n}{SEQ}": results["systems"][n]["policy"] for n in ("gptq-3", mixed)}
            cells = [Cell(key, sequential_cell, _cell_file(args, key), {
                "args": args, "moe": moe, "state": state, "name": key, "policy": policy,
                "result": _cell_file(args, key)}, match=_identity(args, key, "gptq-seq", policy, accuracy=True))
                for key, policy in todo_seq.items()]
            for key, row in zip(todo_seq, run_sweep("moe_quant sequential", cells, executor, args.out / "logs"),
                                strict=True):
                results["systems"][key] = row["system"]
                seq_scores[key] = row["scores"]
            write_atomic(path, json.dumps(results, indent=1) + "\n")
        acc = {"fp": _accuracy(args, loaded, cache=True)}
        if base is not None:
            acc["dense-base"] = _accuracy(args, base, cache=True)
        del loaded, base
        systems = results["systems"]
        names = ["rtn-3", "gptq-3", mixed]  # each cell re-quantizes its system: one quantized model at a time
        names += [k for _b, best, ref in _pairs(args, systems) for k in (best, ref) if k not in names]
        cells = [Cell(f"acc:{name}", accuracy_cell, _cell_file(args, name, "acc-"), {
            "args": args, "moe": moe, "state": state, "name": name, "method": systems[name]["method"],
            "policy": systems[name]["policy"], "result": _cell_file(args, name, "acc-")},
            match=_identity(args, name, systems[name]["method"], systems[name]["policy"], accuracy=True))
                 for name in names]
        for name, row in zip(names, run_sweep("moe_quant accuracy", cells, executor, args.out / "logs"), strict=True):
            acc[name] = row["scores"]
        if args.auto_round:
            acc["auto-round-3"] = ar_scores
        acc.update(seq_scores)
    finally:
        executor.close()
    _report(args, results, acc, np)
    write_atomic(path, json.dumps(results, indent=1) + "\n")
    return results


def _calibrate_once(args: argparse.Namespace, loaded: Any, cluster_tasks: list[str],
                    results: dict) -> tuple[Path, Any, Any]:
    """The one calibration pass (step 1), saved for the cells: ``(state folder, val blocks, test blocks)``.

    ``<state>/hessians.safetensors``: the Hessians; ``<state>/data.safetensors``: the calibration batches
    (``batch.<i>.ids`` / ``batch.<i>.mask``) and the validation and test blocks. Both are rewritten
    (atomically) on every run, as the pass itself is redone, so they always match this run's settings.
    """
    from safetensors.torch import save

    from expertkit.fileio import write_atomic
    from expertkit.quant.calibrate import calibrate
    from expertkit.quant.data import calibration_batches
    from expertkit.quant.targets import find_targets
    from expertkit.tasks.perplexity import heldout_blocks

    tok = loaded.tokenizer
    held = heldout_blocks(tok, split="validation", n_blocks=args.calib_blocks + args.val_blocks)
    val_blocks = held[args.calib_blocks:]  # (V, 128): after the calibration blocks, never seen by it
    test_blocks = heldout_blocks(tok, split="test", n_blocks=args.test_blocks)
    batches = calibration_batches(tok, text_blocks=args.calib_blocks, tasks=cluster_tasks,
                                  prompts_per_task=args.prompts, split="validation", seed=args.seed)
    t0 = time.perf_counter()
    hessians = calibrate(loaded.model, batches, find_targets(loaded.model), min_tokens_per_expert=args.min_tokens)
    results["calibration_seconds"] = round(time.perf_counter() - t0, 1)
    state = args.out / "state"
    hessians.save(state / "hessians.safetensors")
    data = {"val_blocks": val_blocks, "test_blocks": test_blocks}
    for i, (ids, mask) in enumerate(batches):  # (B, T) each
        data[f"batch.{i}.ids"], data[f"batch.{i}.mask"] = ids, mask
    write_atomic(state / "data.safetensors", save({k: v.contiguous() for k, v in data.items()}))
    return state, val_blocks, test_blocks


def _shared(state: Path) -> tuple[Any, list[Any], dict[str, Any]]:
    """What a cell reads back from :func:`_calibrate_once`: ``(Hessians, batches, {val_blocks, test_blocks})``."""
    from safetensors.torch import load_file

    from expertkit.quant.calibrate import Calibration

    data = load_file(str(state / "data.safetensors"))
    n = sum(1 for k in data if k.endswith(".ids"))
    batches = [(data[f"batch.{i}.ids"], data[f"batch.{i}.mask"]) for i in range(n)]
    return Calibration.load(state / "hessians.safetensors"), batches, data


def _cell_file(args: argparse.Namespace, name: str, prefix: str = "") -> Path:
    """``<out>/cells/<prefix><name>.json`` (``block:attention@3`` -> ``block_attention@3.json``)."""
    return args.out / "cells" / (prefix + re.sub(r"[^\w.@-]+", "_", name) + ".json")


def _identity(args: argparse.Namespace, name: str, method: str, policy: dict, *,
              accuracy: bool = False) -> dict[str, Any]:
    """What a cell's result depends on (a saved cell file is reused only when it matches): the MoE (its
    weights' digest), the system and the calibration and block settings, and for an accuracy cell the
    test examples too. With the digest, saved cells can be carried to another machine or session and
    are reused only if the MoE rebuilt there is the same to the byte."""
    keys = ["moe_digest", "group", "calib_blocks", "prompts", "min_tokens", "val_blocks", "test_blocks", "seed",
            "smoke"]
    settings = {k: getattr(args, k) for k in keys + (["tasks", "n"] if accuracy else [])}
    if args.clip_grid and method != "auto-round":  # named only when used, so cells saved before it still match
        settings["clip_grid"] = args.clip_grid
    return {"name": name, "method": method, "policy": policy, "settings": settings}


def system_cell(*, args: argparse.Namespace, moe: Path, state: Path, name: str, method: str, policy: dict,
                result: Path) -> dict[str, Any]:
    """One quantized system (step 2): its bits and its validation and test block NLL, written to ``result``."""
    from expertkit.fileio import write_atomic

    hessians, batches, data = _shared(state)
    t0 = time.perf_counter()
    res = _quantize(moe, args, method, policy, hessians, batches, state)
    row = _system_row(name, res, {"method": method, "policy": policy}, t0, data)
    out = {**_identity(args, name, method, policy), "system": row}
    write_atomic(result, json.dumps(out, indent=1) + "\n")
    return out


def _system_row(name: str, res: Any, head: dict, t0: float, data: dict[str, Any]) -> dict[str, Any]:
    """A quantized system's row: ``head``, its bits, seconds since ``t0``, validation and test block NLL."""
    from expertkit.tasks.perplexity import block_nll

    rep = res.report()
    row = {**head, "bits": rep["bits"]["achieved_bits"], "code_bits": rep["bits"]["code_bits"],
           "by_structure": rep["bits_by_structure"], "seconds": round(time.perf_counter() - t0, 1),
           "val_nll": block_nll(res.loaded.model, data["val_blocks"]),
           "test_nll": block_nll(res.loaded.model, data["test_blocks"])}
    print(f"{name}: {row['bits']:.4f} bits, test ppl {_ppl(row['test_nll']):.3f} ({row['seconds']} s)")
    return row


def accuracy_cell(*, args: argparse.Namespace, moe: Path, state: Path, name: str, method: str, policy: dict,
                  result: Path) -> dict[str, Any]:
    """The per-example test scores (step 4) of one quantized system, quantized again from the shared
    Hessians (deterministic: the same model as its :func:`system_cell`), written to ``result``."""
    from expertkit.fileio import write_atomic

    hessians, batches, _data = _shared(state)
    res = _quantize(moe, args, method, policy, hessians, batches, state)
    out = {**_identity(args, name, method, policy, accuracy=True), "scores": _accuracy(args, res.loaded, cache=False)}
    write_atomic(result, json.dumps(out, indent=1) + "\n")
    return out


def autoround_cell(*, args: argparse.Namespace, moe: Path, state: Path, name: str, bits: int,
                   result: Path) -> dict[str, Any]:
    """auto-round's uniform ``bits`` (SignRound, symmetric, the same group size) on a fresh copy of the MoE:
    its bits, validation and test block NLL and its per-example test scores, written to ``result``.

    Calibration: the same real tokens as GPTQ's (the text blocks and the cluster tasks' prompts, padding
    dropped), concatenated and cut into blocks of the text blocks' length, given to auto-round as batches
    of 8 token-id rows; the router and ``lm_head`` stay unquantized, as in expertkit's targets (checked:
    exactly as many decoder matrices end on the grid as expertkit quantizes). Bits are counted as for
    expertkit's symmetric grid: ``bits + 16 / group`` (one float16 scale per group).
    """
    import torch
    from auto_round import AutoRound

    from expertkit.fileio import write_atomic
    from expertkit.models import load_model
    from expertkit.quant.targets import find_targets
    from expertkit.tasks.perplexity import block_nll

    _hessians, batches, data = _shared(state)
    stream = torch.cat([ids[mask.bool()] for ids, mask in batches])  # every real calibration token, in order
    seq = int(batches[0][0].shape[1])
    blocks = stream[: stream.numel() // seq * seq].view(-1, seq)
    loaded = load_model(str(moe))
    model = loaded.model
    expected = len(find_targets(model))  # the matrices expertkit's systems quantize (experts counted one by one)
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=loaded.tokenizer, bits=bits, group_size=args.group, sym=True,
                   dataset=list(blocks.split(8)), nsamples=blocks.shape[0], seqlen=seq,
                   iters=args.ar_iters, device_map="cpu", layer_config={"lm_head": {"bits": 16}})
    model, _ = ar.quantize()
    seconds = round(time.perf_counter() - t0, 1)
    on_grid, off_grid = _on_grid(model, bits, args.group)
    if len(on_grid) != expected:  # equal bits only if auto-round quantized the same matrices as our systems
        raise RuntimeError(f"auto-round left {len(on_grid)} decoder matrices on a {bits}-bit grid, expertkit's "
                           f"systems quantize {expected} (off the grid: {off_grid}); the comparison would not be "
                           "at equal bits.")
    row = {"method": "auto-round", "policy": {"bits": bits, "iters": args.ar_iters},
           "bits": bits + 16 / args.group, "code_bits": float(bits), "quantized_tensors": len(on_grid),
           "unquantized_tensors": off_grid,
           "calibration_blocks": int(blocks.shape[0]), "seconds": seconds,
           "val_nll": block_nll(model, data["val_blocks"]), "test_nll": block_nll(model, data["test_blocks"])}
    loaded.model = model
    print(f"{name}: {row['bits']:.4f} bits, {len(on_grid)} decoder matrices on the grid, not: {off_grid}, "
          f"test ppl {_ppl(row['test_nll']):.3f}")
    out = {**_identity(args, name, "auto-round", row["policy"], accuracy=True), "system": row,
           "scores": _accuracy(args, loaded, cache=False)}
    write_atomic(result, json.dumps(out, indent=1) + "\n")
    return out


SEQ = "+seq"  # name suffix of a system quantized sequentially (layers_per_pass 1)


def sequential_cell(*, args: argparse.Namespace, moe: Path, state: Path, name: str, policy: dict,
                    result: Path) -> dict[str, Any]:
    """GPTQ under ``policy`` quantized sequentially: ``layers_per_pass: 1``, each layer's Hessians gathered
    on the shared calibration batches through the earlier layers already quantized (the error of the
    earlier layers is fed forward, as sequential GPTQ does), so neither the shared Hessians nor the code
    store apply. Its bits, validation and test block NLL and per-example test scores, written to ``result``."""
    from expertkit.fileio import write_atomic
    from expertkit.models import load_model
    from expertkit.quant.run import quantize_model

    _hessians, batches, data = _shared(state)
    t0 = time.perf_counter()
    res = quantize_model(_config(moe, args, "gptq", policy, layers_per_pass=1), load_model(str(moe)), batches=batches)
    row = _system_row(name, res, {"method": "gptq", "layers_per_pass": 1, "policy": policy}, t0, data)
    out = {**_identity(args, name, "gptq-seq", policy, accuracy=True), "system": row,
           "scores": _accuracy(args, res.loaded, cache=False)}
    write_atomic(result, json.dumps(out, indent=1) + "\n")
    return out


def _on_grid(model: Any, bits: int, group: int, rows: int = 64) -> tuple[list[str], list[str]]:
    """The decoder's 2-D weights (auto-round unfuses the experts into ``nn.Linear``) whose groups of
    ``group`` input columns hold at most ``2 ** bits`` distinct values (checked on the first ``rows``
    rows), and those that do not (the routers should be the only ones)."""
    on, off = [], []
    for name, w in model.state_dict().items():
        if "layers." not in name or w.ndim != 2 or w.shape[1] % group:
            continue
        g = w[:rows].float().reshape(min(rows, w.shape[0]), -1, group).sort(-1).values
        distinct = 1 + (g[..., 1:] != g[..., :-1]).sum(-1)
        (on if int(distinct.max()) <= 2 ** bits else off).append(name)
    return on, off


def _base_name() -> str:
    from expertkit.moe import MoeBuildConfig

    return MoeBuildConfig().base


def _quantize(moe: Path, args: argparse.Namespace, method: str, policy: dict, hessians, batches,
              state: Path | None = None):
    """Quantize a fresh copy of the MoE from the shared Hessians (deterministic: the same system twice is
    the same model). Every (matrix, bits) is solved once for the whole run and kept in ``<state>/codes``
    (:class:`~expertkit.quant.codestore.CodeStore`): the Hessians come from the unquantized MoE, so a
    matrix's codes do not depend on the policy that chose its bits, and the 2-, 3- and 4-bit solutions
    of the 840 matrices serve every policy at every bit point. Without ``state`` (or for RTN): no store."""
    from expertkit.models import load_model
    from expertkit.quant.codestore import CodeStore
    from expertkit.quant.run import quantize_model

    store = None
    if state is not None and method == "gptq":  # another calibration (Hessians digest): another folder
        ident = {k: getattr(args, k) for k in ("moe_digest", "hessians_digest", "calib_blocks", "prompts",
                                               "min_tokens", "seed", "smoke")}
        store = CodeStore(state / "codes" / args.hessians_digest, ident)
    return quantize_model(_config(moe, args, method, policy), load_model(str(moe)), calibration=hessians,
                          batches=batches, store=store)


def _ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def _choose(args: argparse.Namespace, systems: dict, bits: float | None = None) -> str | None:
    """The structure-aware policy with the lowest *validation* perplexity at 3 bits (the run's "mixed"; no
    such policy is an error), or at ``bits`` (None if there is none)."""
    tag = f"{3 if bits is None else bits:g}"
    cands = [f"{p}@{tag}" for p in args.policies if p != "random" and f"{p}@{tag}" in systems]
    if not cands and bits is None:
        raise SystemExit("selection needs 3.0 in --bits and at least one structure-aware policy.")
    return min(cands, key=lambda n: _ppl(systems[n]["val_nll"])) if cands else None


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
    from expertkit.tasks.paired import compare, compare_continuous, gap_closed, verdict

    systems, mixed = results["systems"], results["selected"]
    test = {k: np.array(v["test_nll"]) for k, v in systems.items()}
    lines = [f"Selected on validation: `{mixed}` ({systems[mixed]['bits']:.4f} bits with scales).", ""]

    def claim(a: str, b: str, what: str = "", on: str = "") -> None:
        """Verdicts for "a beats b": lower test NLL (Wilcoxon), and higher accuracy (``on`` the tasks) where
        both have it."""
        c = compare_continuous(test[b], test[a], seed=args.seed)
        lines.append("- " + verdict(f"{a} has lower test NLL than {b}{what}", c, test="Wilcoxon"))
        if a in acc and b in acc:
            c = compare(acc[a], acc[b], seed=args.seed)
            lines.append("- " + verdict(f"{a} is more accurate than {b}{on}{what}", c))

    def closes(uniform: str, system: str) -> tuple[float, float, float]:
        return gap_closed(test["fp"], test[uniform], test[system], seed=args.seed)

    def goal(system: str, uniform: str, span: str) -> list[float]:
        """The 30% goal: does ``system`` close >= 30% of ``uniform``'s perplexity gap? (bootstrap interval)"""
        share, lo, hi = closes(uniform, system)
        word = "supported" if lo >= 0.3 else ("contradicted" if hi < 0.3 else "not shown")
        lines.append(f"- {system} closes >= 30% of the perplexity gap between {uniform} and the unquantized MoE: "
                     f"{word}; closed {share:.1%} [{lo:.1%}, {hi:.1%}]{span}.")
        return [share, lo, hi]

    claim(mixed, "gptq-3", on=f" on {', '.join(args.tasks)}")
    if "auto-round-3" in acc:
        claim(mixed, "auto-round-3", " (equal bits)")
    seq_mixed, seq_gptq = f"{mixed}{SEQ}", f"gptq-3{SEQ}"
    if seq_mixed in acc and seq_gptq in acc:  # the same claims with both quantized sequentially
        for a_, b_ in ((seq_gptq, "gptq-3"), (seq_mixed, mixed), (seq_mixed, seq_gptq)):
            claim(a_, b_)
        results["gap_closed_sequential"] = goal(seq_mixed, seq_gptq, "")
        if "auto-round-3" in acc:
            claim(seq_mixed, "auto-round-3", " (equal bits)")
    claim("gptq-3", "rtn-3")
    results["gap_closed"] = goal(mixed, "gptq-3", f" (95% paired bootstrap over {len(test['fp'])} test blocks)")
    for bits, best, ref in _pairs(args, systems):  # the other points: the policy chosen on validation there
        results.setdefault("selected_at", {})[f"{bits:g}"] = best
        claim(best, ref, f" (selected on validation at {bits:g} bits)")
        if ref.startswith("gptq-"):
            share, lo, hi = closes(ref, best)
            lines.append(f"- {best} closes {share:.1%} [{lo:.1%}, {hi:.1%}] of the perplexity gap between "
                         f"{ref} and the unquantized MoE.")
    lines += ["", "Which structures deserve the bits (each policy against `random` priorities at equal bits, test NLL):"]
    for bits in args.bits:
        for name in args.policies:
            key, ref = f"{name}@{bits:g}", f"random@{bits:g}"
            if name != "random" and key in test and ref in test:
                c = compare_continuous(test[ref], test[key], seed=args.seed)
                lines.append("- " + verdict(f"{key} beats random@{bits:g}", c, test="Wilcoxon"))
    results["accuracy"] = {k: float(np.mean(v)) for k, v in acc.items()}
    results["verdicts"] = lines
    table = ["| system | bits (with scales) | val ppl | test ppl | accuracy |", "|---|---:|---:|---:|---:|"]
    for k, v in systems.items():
        a = f"{results['accuracy'][k]:.3f}" if k in results["accuracy"] else ""
        table.append(f"| {k} | {v['bits']:.3f} | {_ppl(v['val_nll']):.3f} | {_ppl(v['test_nll']):.3f} | {a} |")
    _plots(args, systems, mixed)
    print("\n".join(table + [""] + lines))


def _pairs(args: argparse.Namespace, systems: dict) -> list[tuple[float, str, str]]:
    """``(bits, selected, reference)`` at every bit point but 3 (whose pairs are the run's main claims): the
    structure-aware policy chosen on validation there, and uniform GPTQ at those bits if the run has it
    (integer points), else ``random`` priorities at equal bits."""
    out = []
    for bits in args.bits:
        best = _choose(args, systems, bits)
        ref = f"gptq-{bits:g}" if f"gptq-{bits:g}" in systems else f"random@{bits:g}"
        if bits != 3 and best is not None and ref in systems:
            out.append((bits, best, ref))
    return out


def _plots(args, systems: dict, mixed: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # left: every point (log scale: 2-bit matrices reach 1e7); right: 3 bits and up, where the policies differ by %
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    fp = _ppl(systems["fp"]["test_nll"])
    for ax, low in zip(axes, (0.0, 3.0), strict=True):
        def pts(prefix: str, low: float = low) -> list[tuple[float, float]]:
            return sorted((v["bits"], _ppl(v["test_nll"])) for k, v in systems.items()
                          if k.startswith(prefix) and not k.endswith(SEQ) and v["bits"] >= low)

        for name in args.policies:
            if pts(f"{name}@"):
                ax.plot(*zip(*pts(f"{name}@"), strict=True), marker="o", label=name)
        for method in ("gptq", "rtn"):
            if pts(f"{method}-"):
                ax.plot(*zip(*pts(f"{method}-"), strict=True), marker="s", linestyle="--", label=f"{method} uniform")
        if "auto-round-3" in systems:
            ar = systems["auto-round-3"]
            ax.plot([ar["bits"]], [_ppl(ar["test_nll"])], marker="*", markersize=12, linestyle="none",
                    color="k", label=f"auto-round uniform ({ar['policy']['iters']} iters)")
        for k, marker in ((f"gptq-3{SEQ}", "X"), (f"{mixed}{SEQ}", "P")):
            if k in systems:
                ax.plot([systems[k]["bits"]], [_ppl(systems[k]["test_nll"])], marker=marker, markersize=10,
                        linestyle="none", color="tab:red" if marker == "P" else "tab:gray", label=k)
        ax.axhline(fp, color="k", linewidth=0.8, label="unquantized")
        ax.set(xlabel="average bits per quantized weight (scales counted)", ylabel="test perplexity (BBC)")
    axes[0].set(yscale="log", title="every bit point")
    cut = min(4 * fp, max((_ppl(v["test_nll"]) for v in systems.values() if 3 <= v["bits"] < 16), default=fp))
    axes[1].set(ylim=(fp * 0.95, cut * 1.05), title=f"3 bits and up (y cut at {cut:.0f})")
    axes[1].legend(fontsize=7)
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
