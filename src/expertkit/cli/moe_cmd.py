"""``expertkit moe ...``: build a sparse MoE from the bundled model (``moe build``), read its routing (``moe stats``).

Wired into the main app by :func:`register`. Each command parses its arguments and calls one
library function of :mod:`expertkit.moe`; heavy imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

moe_app = typer.Typer(
    help="Mixture-of-experts models: build one from a dense base (Branch-Train-MiX), read its routing statistics.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(soft_wrap=True)


@moe_app.command("build")
def build_cmd(
    config: Annotated[Path | None, typer.Argument(help="a build recipe YAML (omit for the default recipe)")] = None,
    out_dir: Annotated[Path | None, typer.Argument(help="where to copy the finished MoE (default: only the cache)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Build a sparse MoE from a dense base; a finished build of the same recipe is reused from the cache."""
    from expertkit.config import load_config, validate
    from expertkit.moe import MoeBuildConfig, build_moe

    recipe = load_config(MoeBuildConfig, config) if config is not None else validate(MoeBuildConfig, {})
    result = build_moe(recipe, out_dir, overwrite=overwrite)
    ranks = result.meta["difference_ranks"]["pairwise"]
    full = result.meta["difference_ranks"]["full_rank"]
    how = "reused from the cache" if result.reused else f"built in {result.meta['seconds'] / 60:.1f} min"
    out.print(f"MoE {result.path} ({how}; recipe {result.fingerprint}): {len(recipe.clusters)} experts, top-{recipe.top_k}, "
              f"{recipe.target}. Expert differences: effective rank {ranks['entropy_rank_mean']:.0f} "
              f"(90% energy in {ranks['energy90_rank_mean']:.0f}) of {full}.", markup=False, highlight=False)


@moe_app.command("stats")
def stats_cmd(
    model: Annotated[str, typer.Argument(help="an MoE model folder (or bundled name)")],
    task: Annotated[list[str], typer.Option("--task", "-t", help="calibration task (repeat for several)")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for stats.json, stats.npz and heatmaps")] = Path(
        "moe-stats"),
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="prompts per task")] = 64,
    split: Annotated[str, typer.Option(help="train, validation or test")] = "validation",
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per forward pass")] = 8,
    sample_tokens: Annotated[int, typer.Option(min=0, help="tokens per batch and layer for expert-output similarity")] = 16,
    seed: Annotated[int, typer.Option(help="seed of the prompts and the token sample")] = 0,
) -> None:
    """Per layer and expert: token counts, co-activation, router-logit and output similarity, task profiles."""
    from expertkit.models.loader import resolve
    from expertkit.moe import moe_structure, routing_stats
    from expertkit.moe.plots import task_heatmap, usage_heatmap

    _kind, folder = resolve(model)
    if folder is not None:
        moe_structure(folder)  # a dense or inconsistent checkpoint fails here, before loading weights
    stats = routing_stats(model, task, n=n, split=split, seed=seed, batch_size=batch_size, sample_tokens=sample_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats.save(out_dir / "stats.npz")
    usage_heatmap(stats, out_dir / "usage.png")
    task_heatmap(stats, out_dir / "tasks.png")
    s = stats.summary()
    cond = "-" if s["conditional_entropy_bits"] is None else f"{s['conditional_entropy_bits']:.2f}"
    out.print(f"{s['layers']} MoE layers x {s['num_experts']} experts (top-{s['top_k']}), {s['tokens']} tokens: "
              f"routing entropy {s['marginal_entropy_bits']:.2f} bits (max {s['max_entropy_bits']:.2f}), "
              f"given the task {cond} bits; balance CV {s['balance_cv']:.2f}. Wrote {out_dir}/stats.json, "
              "stats.npz, usage.png, tasks.png.", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``moe`` command group to the main app."""
    app.add_typer(moe_app, name="moe")
