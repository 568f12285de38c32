"""The quantization run: calibrate, score, allocate bits, quantize, report (``expertkit quantize``).

:func:`quantize_model` works on a loaded model in memory and returns a :class:`QuantResult`;
:func:`quantize` also writes the formats the config asks for (:mod:`expertkit.quant.storage`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertkit.errors import ConfigError
from expertkit.quant.apply import Record, quantize_targets, summarize
from expertkit.quant.budget import Allocation, Format, Unit, allocation, solve_budget
from expertkit.quant.calibrate import Calibration, calibrate, expert_token_table, last_layer
from expertkit.quant.config import QuantizeConfig
from expertkit.quant.gptq import GptqSettings
from expertkit.quant.policy import (
    BUDGETED,
    BlockImportancePolicy,
    ExpertFrequencyPolicy,
    OutlierPolicy,
    PolicyContext,
    fixed_bits,
    scores,
)
from expertkit.quant.targets import Target, find_targets


@dataclass
class QuantResult:
    """A quantized model in memory and everything about how it was made."""

    config: QuantizeConfig
    loaded: Any  # expertkit.models.LoadedModel, its model quantized in place
    targets: list[Target]
    records: dict[str, Record]
    allocation: Allocation
    calibration: Calibration | None
    context: PolicyContext
    seconds: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """JSON-able summary: bits, tokens per expert, errors, times."""
        other = sum(p.numel() for p in self.loaded.model.parameters()) - self.allocation.weights
        from expertkit.quant.budget import model_bits
        from expertkit.quant.report import bits_by_structure

        out: dict[str, Any] = {
            "model": self.loaded.name, "method": self.config.method, "policy": self.config.policy.model_dump(mode="json"),
            "bits": self.allocation.summary(), "model_bits_per_parameter": model_bits(self.allocation, other),
            "unquantized_parameters": other, "bits_by_structure": bits_by_structure(self.records),
            "quantization": summarize(self.records), "seconds": self.seconds,
            "policy_info": self.context.info,
        }
        if self.calibration is not None:
            out["calibration_tokens"] = max(self.calibration.tokens.values(), default=0)
            out["tokens_per_expert"] = self.calibration.expert_report()
        return out


def _layer_chunks(targets: list[Target], per_pass: int) -> list[set[tuple[str | None, int]]]:
    keys = sorted({t.layer_key for t in targets}, key=lambda k: (k[0] or "", k[1]))
    if per_pass <= 0:
        return [set(keys)]
    return [set(keys[i:i + per_pass]) for i in range(0, len(keys), per_pass)]


def _context(policy: Any, loaded: Any, targets: list[Target], calib: Calibration | None, block_obs: Any) -> PolicyContext:
    ctx = PolicyContext()
    if isinstance(policy, OutlierPolicy):
        from expertkit.quant.scorers import outlier_score

        ctx.outliers = {t.name: outlier_score(t.read(loaded.model)) for t in targets}
        ctx.info["outlier_scores"] = ctx.outliers
    if isinstance(policy, ExpertFrequencyPolicy):
        ctx.frequencies = _frequencies(policy, loaded, targets, calib)
        ctx.info["frequencies"] = {f"{k[0] + '.' if k[0] else ''}{k[1]}": v.round(4).tolist()
                                   for k, v in ctx.frequencies.items()}
    if isinstance(policy, BlockImportancePolicy):
        ctx.block_importance, extra = block_obs.importance(predicted=policy.predicted)
        ctx.info["block_importance"] = {f"{k[0] + '.' if k[0] else ''}{k[1]}": v for k, v in ctx.block_importance.items()}
        ctx.info.update({f"block_predictor_{k}": v for k, v in extra.items()})
    return ctx


def _frequencies(policy: ExpertFrequencyPolicy, loaded: Any, targets: list[Target],
                 calib: Calibration | None) -> dict[tuple[str | None, int], np.ndarray]:
    """Routing share per expert of every MoE layer: from routing_stats over ``policy.tasks``, or from the
    calibration pass's router counts."""
    by_module = {t.hessian.split("[")[0]: t.layer_key for t in targets if t.expert is not None}
    if policy.tasks:
        from expertkit.moe import routing_stats

        stats = routing_stats(loaded, list(policy.tasks), n=policy.n)
        freq = stats.frequencies()  # (L, E), rows in the tap's layer order
        keys = sorted(set(by_module.values()), key=lambda k: (k[0] or "", k[1]))
        names = [(f"{k[0]}.{k[1]}" if k[0] else str(k[1])) for k in keys]
        return {k: freq[stats.layers.index(n)] for k, n in zip(keys, names, strict=True)}
    out = {}
    for module, counts in (calib.routed if calib else {}).items():
        if module in by_module:
            c = np.asarray(counts, dtype=float)
            out[by_module[module]] = c / max(c.sum(), 1.0)
    return out


def quantize_model(config: QuantizeConfig, loaded: Any = None, *, calibration: Calibration | None = None,
                   batches: list[Any] | None = None, store: Any = None) -> QuantResult:
    """Quantize ``config.model`` (or ``loaded``) in memory as ``config`` says.

    ``calibration`` reuses Hessians collected earlier on the same (unquantized) model, e.g. to
    quantize it several ways from one calibration pass (only with ``layers_per_pass: 0``). ``store``
    (a :class:`~expertkit.quant.codestore.CodeStore` of this model and this calibration) then lets those
    ways share every matrix already quantized at its bits; GPTQ needs ``calibration`` for it, since
    Hessians gathered while quantizing depend on what was quantized before.
    """
    from expertkit.models import load_model
    from expertkit.quant.data import calibration_batches
    from expertkit.quant.scorers import BlockImportance, ffn_blocks

    if store is not None and config.method == "gptq" and calibration is None:
        raise ConfigError("a code store needs GPTQ's Hessians from one pass over the unquantized model "
                          "(calibration=...): Hessians gathered while quantizing depend on the allocation.")
    started = time.perf_counter()
    loaded = loaded if loaded is not None else load_model(config.model)
    model, cal = loaded.model, config.calibration
    targets = find_targets(model)
    fmt = Format(config.group_size, config.symmetric, config.scale_dtype, config.clip_grid)
    policy = config.policy
    needs_data = config.method == "gptq" or isinstance(policy, (ExpertFrequencyPolicy, BlockImportancePolicy))
    observe = isinstance(policy, BlockImportancePolicy)  # block inputs and outputs: always a pass of its own data
    if (needs_data and calibration is None or observe) and batches is None:
        batches = calibration_batches(loaded.tokenizer, text_blocks=cal.text_blocks, seq_len=cal.seq_len,
                                      tasks=cal.tasks, prompts_per_task=cal.prompts_per_task, split=cal.split,
                                      batch_size=cal.batch_size, seed=cal.seed)
    block_obs = BlockImportance(ffn_blocks(model, targets), seed=cal.seed) if observe else None
    if block_obs is not None and calibration is not None:  # Hessians given: one forward pass for the observer
        calibrate(model, batches, [], observers=[block_obs], description="Block importance")
    chunks = _layer_chunks(targets, cal.layers_per_pass if calibration is None else 0)
    seconds: dict[str, float] = {"calibrate": 0.0, "quantize": 0.0}
    settings = GptqSettings(config.gptq.damp, config.gptq.block_size, config.gptq.act_order)
    records: dict[str, Record] = {}
    kept = calibration  # what the report shows: the first pass's router counts, every chunk's Hessian tokens
    alloc = ctx = None
    for i, chunk in enumerate(chunks):
        calib = calibration
        if calib is None and (config.method == "gptq" or (needs_data and i == 0)):
            t0 = time.perf_counter()
            # the pass ends after the last layer it needs: every layer with targets on the first pass (the
            # allocation reads every MoE layer's routed counts then), the chunk's last layer on later ones
            calib = calibrate(model, batches, targets if config.method == "gptq" else [],
                              min_tokens_per_expert=cal.min_tokens_per_expert, layers=chunk,
                              stop_after=last_layer(model, targets, chunk if i else None),
                              observers=[block_obs] if (block_obs is not None and i == 0) else [],
                              description=f"Calibrating ({i + 1}/{len(chunks)})" if len(chunks) > 1 else "Calibrating")
            seconds["calibrate"] += time.perf_counter() - t0
            if len(chunks) == 1:
                kept = calib
            else:  # each layer's counts from the pass its Hessians came from (routing changes as layers are quantized)
                kept = kept if kept is not None else Calibration(routed=dict(calib.routed))
                mine = {t.hessian.split("[")[0] for t in targets if t.expert is not None and t.layer_key in chunk}
                kept.routed.update({k: v for k, v in calib.routed.items() if k in mine})
                kept.tokens.update(calib.tokens)
                kept.added.update(calib.added)
        if alloc is None:
            alloc, ctx = _allocate(policy, loaded, targets, fmt, kept, block_obs)
        t0 = time.perf_counter()
        part = [t for t in targets if t.layer_key in chunk]
        hess = calib.hessians.get if (calib is not None and config.method == "gptq") else None
        records.update(quantize_targets(model, part, alloc.bits, fmt, method=config.method, hessian=hess,
                                        settings=settings, store=store))
        seconds["quantize"] += time.perf_counter() - t0
        if calib is not None and calib is not calibration and len(chunks) > 1:
            calib.hessians.clear()  # this chunk is done: free its Hessians
    loaded.fingerprint = None  # the weights changed: the source folder's fingerprint no longer names them
    seconds["total"] = time.perf_counter() - started
    return QuantResult(config, loaded, targets, records, alloc, kept, ctx,
                       {k: round(v, 2) for k, v in seconds.items()})


def _allocate(policy: Any, loaded: Any, targets: list[Target], fmt: Format, calib: Calibration | None,
              block_obs: Any) -> tuple[Allocation, PolicyContext]:
    units = [Unit(t.name, t.rows, t.cols) for t in targets]
    ctx = _context(policy, loaded, targets, calib, block_obs)
    if not isinstance(policy, BUDGETED):
        return allocation(units, fixed_bits(policy, targets), fmt), ctx
    score = scores(policy, targets, ctx)
    units = [Unit(t.name, t.rows, t.cols, policy.boost ** score[t.name]) for t in targets]
    return solve_budget(units, policy.choices, policy.target_bits, fmt), ctx


def quantize(config: QuantizeConfig, out: str | Path, *, overwrite: bool = False) -> tuple[QuantResult, dict[str, Path]]:
    """Quantize and write every format of ``config.formats`` under ``out``; returns the result and the paths."""
    from expertkit.quant.storage import write_outputs

    result = quantize_model(config)
    return result, write_outputs(result, Path(out), overwrite=overwrite)


def tokens_per_expert(result: QuantResult) -> np.ndarray:
    """``(MoE layers, experts)`` tokens each expert's Hessian saw."""
    return expert_token_table(result.calibration) if result.calibration else np.zeros((0, 0))
