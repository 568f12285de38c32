"""``expertkit moe compress CONFIG OUT``: merge and compress an MoE's experts (MC-SMoE and baselines).

The command joins the ``moe`` group of :mod:`expertkit.cli.moe_cmd` from this file (:func:`register`),
so that file is not edited. ``expertkit moe compress methods`` lists the registered methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console(soft_wrap=True)


def _print_methods() -> None:
    """Every registered compression method: summary, paper, parameters with defaults and help."""
    from expertkit.moe.compress import METHODS

    for entry in METHODS:
        needs = f", needs {', '.join(sorted(entry.obj.needs))} scores" if entry.obj.needs else ""
        out.print(f"[bold]{entry.name}[/bold]: {entry.summary}{needs}", highlight=False)
        out.print(f"    paper: {entry.paper}", highlight=False)
        for pname, field in entry.params.model_fields.items():
            out.print(f"    {pname} (default {field.default!r}): {field.description or ''}", highlight=False)


def compress_cmd(
    config: Annotated[str, typer.Argument(help="a compression recipe YAML (see docs/moe_compress.md), or 'methods'")],
    out_dir: Annotated[Path | None, typer.Argument(help="the compressed model folder to write")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Merge (M-SMoE and baselines) or prune an MoE's experts, optionally factor and distill them."""
    from expertkit.errors import ConfigError

    if config == "methods" and out_dir is None:
        _print_methods()
        return
    if out_dir is None:
        raise ConfigError("give the output folder: expertkit moe compress CONFIG OUT.")
    from expertkit.config import load_config
    from expertkit.moe.compress import CompressConfig, compress_moe

    recipe = load_config(CompressConfig, config)
    result = compress_moe(recipe, out_dir, overwrite=overwrite)
    r = result.record
    p, f = r["expert_parameters"], r["expert_flops_per_token"]
    if r["stock"]:
        form = f"; stock transformers form in {out_dir}/stock ({'exact' if r['stock_exact'] else 'approximate routing'})"
    else:
        form = "; no stock form (per-layer expert counts)" if recipe.stock else ""
    kd = f", {recipe.kd.steps} distillation steps" if recipe.kd.steps else ""
    err = (r.get("lowrank") or {}).get("relative_error")
    if err:  # the C step's weight error, mean over layers: 0 = exact, 1 = nothing of the matrix kept
        kd = "; low rank + sparse weight error (relative, mean over layers) " + ", ".join(
            f"{p} {v:.2f}" for p, v in err.items()) + kd
    out.print(f"Compressed {recipe.model} with {recipe.method}{kd} into {out_dir}: experts per layer "
              f"{r['experts_per_layer']}; expert parameters {p['after']:,} of {p['before']:,} "
              f"({100 * p['removed_share']:.1f}% removed), expert FLOPs per token {100 * f['removed_share']:.1f}% "
              f"fewer{form}.", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``compress`` to the ``moe`` command group."""
    from expertkit.cli.moe_cmd import moe_app

    moe_app.command("compress")(compress_cmd)
