"""``expertkit quantize CONFIG OUT``: post-training quantization (GPTQ or RTN, bit policies, budget solver).

Wired into the main app by :func:`register`. The command parses, validates the config and calls
:func:`expertkit.quant.run.quantize`; heavy imports stay inside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
    report = result.report()
    if report.get("tokens_per_expert"):
        seen = [r + d for v in report["tokens_per_expert"].values() for r, d in zip(v["routed"], v["added"], strict=True)]
        added = sum(sum(v["added"]) for v in report["tokens_per_expert"].values())
        out.print(f"Tokens per expert: min {min(seen)}, max {max(seen)} ({added} added for balance); "
                  f"see {out_dir / 'quantization.json'}.", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``expertkit quantize`` to the main app."""
    app.command("quantize")(quantize)
