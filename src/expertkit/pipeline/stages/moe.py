"""MoE stages: ``moe_build`` (a sparse MoE from the run's base) and ``moe_stats`` (its routing).

* ``moe_build``: :func:`~expertkit.moe.build_moe` with the run's model as the base (the recipe's
  fields are the stage's parameters); the MoE is copied to ``<run>/moe/`` and, with ``n > 0``,
  evaluated beside the base on every cluster task (the same examples for both).
* ``moe_stats``: routing statistics of that MoE (or of ``model``) over the clusters' tasks, with the
  layer x expert and task x expert heatmaps in the run folder.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from expertkit.config import Config
from expertkit.moe.config import MoeBuildConfig
from expertkit.pipeline.config import STAGES
from expertkit.pipeline.context import RunContext


class MoeBuildParams(MoeBuildConfig):
    """Parameters of the ``moe_build`` stage: a build recipe whose base defaults to the run's model."""

    base: str | None = Field(None, description="the dense base; default: the run's model")  # type: ignore[assignment]
    n: int = Field(0, ge=0, description="evaluation examples per cluster task for the MoE and the base (0 = skip)")
    split: str = Field("test", pattern="^(validation|test)$", description="evaluation split")
    eval_batch_size: int = Field(16, ge=1, description="examples per forward pass when evaluating")


class MoeBuildStage:
    """Build the MoE (or reuse it from the cache), copy it into the run, optionally evaluate it."""

    def run(self, ctx: RunContext, params: MoeBuildParams) -> dict[str, Any]:
        """Build into ``<run>/moe`` and evaluate MoE and base on the clusters' tasks."""
        from expertkit.models import load_model
        from expertkit.models.bundled import cache_root
        from expertkit.moe import build_moe
        from expertkit.tasks.evaluate import evaluate

        recipe = MoeBuildConfig.model_validate({
            **params.model_dump(exclude={"base", "n", "split", "eval_batch_size"}),
            "base": params.base or str(ctx.config.model)})
        result = build_moe(recipe, ctx.run_dir / "moe", overwrite=True)
        scores: dict[str, dict[str, Any]] = {}
        if params.n:
            moe = load_model(result.path)
            for cluster in recipe.clusters:
                for task in cluster.tasks:
                    row = {}
                    for label, model in (("base", ctx.model()), ("moe", moe)):
                        r = evaluate(model, None, task, split=params.split, n=params.n, seed=ctx.seed,
                                     batch_size=params.eval_batch_size, cache_dir=cache_root() / "eval")
                        row[label] = {"accuracy": r.accuracy, "ci": [r.ci_low, r.ci_high]}
                    scores[task] = {"cluster": cluster.name, **row}
        ranks = result.meta["difference_ranks"]
        return {"path": "moe", "fingerprint": result.fingerprint, "reused": result.reused,
                "experts": [c.name for c in recipe.clusters], "top_k": recipe.top_k, "target": recipe.target,
                "minutes": round(result.meta["seconds"] / 60, 1), "rank": ranks["pairwise"],
                "full_rank": ranks["full_rank"], "split": params.split, "n": params.n, "scores": scores}

    def report(self, result: dict[str, Any]) -> str:
        """How the MoE was built, the rank of its expert differences, and MoE vs base per task."""
        r = result["rank"]
        how = "reused from the cache" if result["reused"] else f"built in {result['minutes']} min"
        lines = [f"`{result['path']}/`: {result['target']} with {len(result['experts'])} experts "
                 f"({', '.join(result['experts'])}), top-{result['top_k']}; "
                 f"{how} "
                 f"(recipe {result['fingerprint']}). Pairwise expert differences: effective rank "
                 f"{r['entropy_rank_mean']:.0f} of {result['full_rank']} (90% energy in {r['energy90_rank_mean']:.0f})."]
        if result["scores"]:
            lines += ["", "| task | cluster | base | MoE |", "|---|---|---:|---:|"]
            for task, s in result["scores"].items():
                cells = [f"{s[k]['accuracy']:.2f} [{s[k]['ci'][0]:.2f}, {s[k]['ci'][1]:.2f}]" for k in ("base", "moe")]
                lines.append(f"| {task} | {s['cluster']} | {cells[0]} | {cells[1]} |")
            lines += ["", f"Accuracy on the {result['split']} split, n = {result['n']} per task (same examples), "
                      "95% Wilson intervals."]
        return "\n".join(lines)


class MoeStatsParams(Config):
    """Parameters of the ``moe_stats`` stage."""

    model: str | None = Field(None, description="an MoE folder; default: the run's moe_build output")
    tasks: list[str] | None = Field(None, description="calibration tasks; default: the built MoE's cluster tasks")
    n: int = Field(64, ge=1, description="prompts per task")
    split: str = Field("validation", pattern="^(train|validation|test)$", description="split of the prompts")


class MoeStatsStage:
    """Routing statistics of the run's MoE, with heatmaps."""

    def run(self, ctx: RunContext, params: MoeStatsParams) -> dict[str, Any]:
        """Collect the statistics (cached), write stats.npz / usage.png / tasks.png in the run folder."""
        from expertkit.errors import ConfigError
        from expertkit.moe import routing_stats
        from expertkit.moe.plots import task_heatmap, usage_heatmap

        built = ctx.earlier("moe_build")
        model = params.model or (str(ctx.run_dir / built[-1]["path"]) if built else None)
        if model is None:
            raise ConfigError("moe_stats: no model given and no moe_build stage earlier in the run; add one of them.")
        tasks = params.tasks or (list(built[-1]["scores"]) if built and built[-1]["scores"] else None)
        if not tasks:
            raise ConfigError("moe_stats: give 'tasks:' (the built MoE was not evaluated on any task).")
        stats = routing_stats(model, tasks, n=params.n, split=params.split, seed=ctx.seed)
        stats.save(ctx.run_dir / "moe_stats.npz")
        usage_heatmap(stats, ctx.run_dir / "moe_usage.png")
        task_heatmap(stats, ctx.run_dir / "moe_tasks.png")
        return {"model": model, "summary": stats.summary(), "usage": "moe_usage.png", "tasks": "moe_tasks.png"}

    def report(self, result: dict[str, Any]) -> str:
        """Entropies and balance, and the two heatmaps."""
        s = result["summary"]
        return (f"Routing of `{result['model']}` over {', '.join(s['tasks'])}: entropy {s['marginal_entropy_bits']:.2f} "
                f"bits (max {s['max_entropy_bits']:.2f}), given the task {s['conditional_entropy_bits']:.2f} bits; "
                f"balance CV {s['balance_cv']:.2f}.\n\n![layer x expert]({result['usage']})\n\n"
                f"![task x expert]({result['tasks']})")


STAGES.add("moe_build", MoeBuildStage(), params=MoeBuildParams,
           summary="build a sparse MoE from the base (Branch-Train-MiX), cached by its recipe; optionally evaluate it")
STAGES.add("moe_stats", MoeStatsStage(), params=MoeStatsParams,
           summary="routing statistics of an MoE (token counts, similarities, task profiles) with heatmaps")
