"""``expertkit quant ...``: post-training quantization (GPTQ or RTN, bit policies, budget solver).

* ``expertkit quant run CONFIG OUT`` (also ``expertkit quantize CONFIG OUT``): quantize and store;
* ``expertkit quant policies``: the bit policies and their parameters, read from the config models;
* ``expertkit quant inspect FOLDER``: bits per structure of a quantized folder, from its ``quantization.json``.

Wired into the main app by :func:`register`. The commands parse, validate and call
:mod:`expertkit.quant`; heavy imports stay inside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

quant_app = typer.Typer(
    help="Post-training quantization: GPTQ or round-to-nearest, bits per structure (block, expert, linear) "
         "under an exact bit budget, stored as compressed-tensors.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(soft_wrap=True)


def quantize(
    config: Annotated[Path, typer.Argument(help="a quantization config YAML (see docs/quant.md)")],
    out_dir: Annotated[Path, typer.Argument(help="output folder (written atomically)")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists (only once the new one is complete).")] = False,
    check: Annotated[bool, typer.Option("--check", help="Validate the config only; load and write nothing.")] = False,
) -> None:
    """Quantize a model's linear weights (GPTQ or round-to-nearest) with a bit policy, and store it."""
    from expertkit.config import load_config
    from expertkit.errors import CheckpointError
    from expertkit.quant.config import QuantizeConfig

    cfg = load_config(QuantizeConfig, config)
    if check:
        out.print(f"[green]ok[/green]: {config}: {cfg.method} of {cfg.model} with a {cfg.policy.kind} policy, "
                  f"written as {', '.join(cfg.formats)}.", highlight=False)
        return
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} exists; pass --overwrite to replace it.")
    from expertkit.quant.run import quantize as run

    result, paths = run(cfg, out_dir, overwrite=overwrite)
    a = result.allocation
    widths = ", ".join(f"{b}-bit {n / a.weights:.0%}" for b, n in sorted(a.per_width.items()))
    target = f" (target {a.target})" if a.target is not None else ""
    out.print(f"[green]done[/green]: {len(result.records)} matrices, {a.achieved:.4f} bits per weight with scales"
              f"{target}; {widths}. Wrote {', '.join(f'{k}: {v}' for k, v in paths.items())}.", highlight=False)
    seen, added = _expert_tokens(result.report())
    if seen:
        out.print(f"Tokens per expert: min {min(seen)}, max {max(seen)} ({added} added for balance); "
                  f"see {out_dir / 'quantization.json'}.", highlight=False)


def _expert_tokens(report: dict) -> tuple[list[int], int]:
    """Tokens each expert's Hessian saw, and how many were added for balance, from a report."""
    per = report.get("tokens_per_expert") or {}
    seen = [r + d for v in per.values() for r, d in zip(v["routed"], v["added"], strict=True)]
    return seen, sum(sum(v["added"]) for v in per.values())


@quant_app.command("policies")
def policies() -> None:
    """The bit policies a config's ``policy:`` can name, with their parameters and defaults."""
    from typing import get_args

    from expertkit.cli.helptext import plain
    from expertkit.quant.policy import Policy

    union = get_args(Policy)[0]
    for cls in get_args(union):
        fields = {k: f for k, f in cls.model_fields.items() if k != "kind"}
        doc = plain((cls.__doc__ or "").strip().splitlines()[0])
        out.print(f"[bold]{cls.model_fields['kind'].default}[/bold]: {doc}", highlight=False)
        for name, f in fields.items():
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            help_ = f" ({f.description})" if f.description else ""
            out.print(f"    {name}: {default}{help_}", highlight=False, markup=False)


@quant_app.command("inspect")
def inspect(folder: Annotated[Path, typer.Argument(help="a folder written by `expertkit quant run`")]) -> None:
    """Bits per structure, achieved average and layer errors of a quantized folder."""
    from expertkit.quant.report import read_report, structure_table

    report = read_report(folder)
    b = report["bits"]
    target = f" (target {b['target_bits']})" if b["target_bits"] is not None else ""
    out.print(f"{folder}: {report['method']} with a {report['policy']['kind']} policy; {b['achieved_bits']:.4f} "
              f"bits per quantized weight, scales and zero-points counted{target}; "
              f"{report['model_bits_per_parameter']:.3f} bits per parameter of the whole model.", highlight=False)
    out.print(structure_table(report), markup=False, highlight=False)
    seen, added = _expert_tokens(report)
    if seen:
        out.print(f"Tokens per expert: min {min(seen)}, max {max(seen)} ({added} added for balance).", highlight=False)


quant_app.command("run")(quantize)


def register(app: typer.Typer) -> None:
    """Add ``expertkit quant ...`` and its shortcut ``expertkit quantize`` to the main app."""
    app.add_typer(quant_app, name="quant")
    app.command("quantize")(quantize)
