"""``expertkit merge CONFIG OUT``: run a (mergekit-compatible) merge config; ``expertkit merge methods``
lists the registered merge methods with their parameters.

Wired into the main app by :func:`register`. Heavy imports stay inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console(soft_wrap=True)


def _print_methods() -> None:
    """Every registered merge method: summary, paper, parameters with defaults and help."""
    from expertkit.merge import METHODS

    for entry in METHODS:
        m = entry.obj
        needs = ", needs a base" if m.needs_base else ""
        stats = f", needs per-model {m.stats} statistics" if m.stats else ""
        out.print(f"[bold]{entry.name}[/bold]: {entry.summary}{needs}{stats}", highlight=False)
        out.print(f"    paper: {entry.paper}", highlight=False)
        for pname, field in entry.params.model_fields.items():
            key = field.serialization_alias or pname
            per = " \\[per model]" if pname in m.per_model else ""
            default = "required" if field.is_required() else f"default {field.default!r}"
            out.print(f"    {key} ({default}){per}: {field.description or ''}", highlight=False)


def merge(
    config: Annotated[str, typer.Argument(help="merge config YAML (mergekit-compatible), or 'methods'")],
    out_dir: Annotated[Path | None, typer.Argument(help="output model folder (created atomically)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists (only once the new one is complete).")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow .bin/.pt input weights (weights_only=True).")] = False,
    check: Annotated[bool, typer.Option("--check", help="Validate the config and the models' compatibility; write nothing.")] = False,
) -> None:
    """Merge models tensor by tensor as a config says; ``expertkit merge methods`` lists the methods."""
    from expertkit.errors import ConfigError

    if config == "methods" and out_dir is None:
        _print_methods()
        return
    from expertkit.merge.config import load_merge_config

    cfg = load_merge_config(config)
    if check:
        from expertkit.merge.executor import prepare
        from expertkit.merge.sources import SourceSet

        sources = SourceSet(base_ref=cfg.base_model, allow_pickle=allow_pickle)
        try:
            plan = prepare(cfg, sources)
        finally:
            sources.close()
        out.print(f"[green]ok[/green]: {config}: {cfg.merge_method} over {len(plan.jobs[0].inputs)} model(s), "
                  f"{len(plan.jobs)} tensors; the models are compatible.", highlight=False)
        return
    if out_dir is None:
        raise ConfigError("missing OUT: give the output folder, e.g. expertkit merge merge.yaml out/merged")
    from expertkit.merge.executor import run_merge

    path = run_merge(cfg, out_dir, overwrite=overwrite, allow_pickle=allow_pickle)
    out.print(f"[green]done[/green]: merged model at {path}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``expertkit merge`` to the main app."""
    app.command("merge")(merge)
