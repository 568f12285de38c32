"""The ``moe_compress`` stage: merge and compress the experts of the run's MoE (MC-SMoE and baselines).

The MoE is ``model`` when given, else the output of the last ``moe_build`` stage, else the run's
model. The compressed model is written to ``<run>/compressed/<label>/`` (label: the method name by
default); with ``n > 0`` it is evaluated beside the original MoE on the calibration tasks (the same
test examples for both) with a paired test on the pooled examples.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from expertkit.moe.compress.config import CompressConfig
from expertkit.pipeline.config import STAGES
from expertkit.pipeline.context import RunContext


class MoeCompressParams(CompressConfig):
    """Parameters of the ``moe_compress`` stage: a compression recipe whose model defaults to the run's MoE."""

    model: str | None = Field(None, description="the MoE; default: the last moe_build output, else the run's model")  # type: ignore[assignment]
    label: str | None = Field(None, pattern=r"^[\w.-]+$", description="output folder name; default: the method")
    n: int = Field(0, ge=0, description="test examples per calibration task for the original and compressed MoE")
    eval_batch_size: int = Field(16, ge=1, description="examples per forward pass when evaluating")


class MoeCompressStage:
    """Compress the run's MoE into ``<run>/compressed/<label>``; optionally evaluate it against the original."""

    def run(self, ctx: RunContext, params: MoeCompressParams) -> dict[str, Any]:
        """Compress, then evaluate original and compressed on the same examples."""
        from expertkit.models import load_model
        from expertkit.models.bundled import cache_root
        from expertkit.moe.compress import compress_moe
        from expertkit.moe.compress.api import calibration_tasks, model_folder
        from expertkit.moe.compressed import expert_parameters
        from expertkit.tasks.evaluate import evaluate
        from expertkit.tasks.paired import compare

        built = ctx.earlier("moe_build")
        source = params.model or (str(ctx.run_dir / built[-1]["path"]) if built else str(ctx.config.model))
        recipe = CompressConfig.model_validate({
            **params.model_dump(exclude={"model", "label", "n", "eval_batch_size"}), "model": source})
        label = params.label or params.method
        out = ctx.run_dir / "compressed" / label
        result = compress_moe(recipe, out, overwrite=True)
        rec = result.record
        compressed = load_model(out)
        row = {"path": f"compressed/{label}", "method": params.method, "experts_per_layer": rec["experts_per_layer"],
               "expert_parameters": rec["expert_parameters"], "in_memory": expert_parameters(compressed.model),
               "flops": rec["expert_flops_per_token"], "stock": rec["stock"], "stock_exact": rec["stock_exact"],
               "lowrank": rec["lowrank"], "kd_steps": recipe.kd.steps, "n": params.n, "scores": {}}
        if params.n:
            tasks = calibration_tasks(recipe, model_folder(source))
            original = load_model(source)
            pooled: dict[str, list[float]] = {"original": [], "compressed": []}
            for task in tasks:
                for name, model in (("original", original), ("compressed", compressed)):
                    r = evaluate(model, None, task, split="test", n=params.n, seed=ctx.seed,
                                 batch_size=params.eval_batch_size, cache_dir=cache_root() / "eval")
                    row["scores"].setdefault(task, {})[name] = r.accuracy
                    pooled[name] += r.scores
            row["paired"] = compare(pooled["compressed"], pooled["original"], seed=ctx.seed).as_dict()
        return row

    def report(self, result: dict[str, Any]) -> str:
        """Parameters and FLOPs kept, forms written, and accuracy against the original."""
        p, f = result["expert_parameters"], result["flops"]
        low = result["lowrank"]
        steps = [result["method"]]
        if low:
            steps.append(f"low rank + sparse (keep {low['keep']})")
        if result["kd_steps"]:
            steps.append(f"{result['kd_steps']} distillation steps")
        lines = [f"`{result['path']}/`: {' + '.join(steps)}; "
                 f"experts per layer {result['experts_per_layer']}; expert parameters {p['after']:,} of {p['before']:,} "
                 f"({100 * p['removed_share']:.0f}% removed; {result['in_memory']:,} in memory), expert FLOPs per "
                 f"token {100 * f['removed_share']:.0f}% fewer. Stock transformers form: "
                 + ("`stock/` (" + ("exact" if result["stock_exact"] else "router rows combined: approximate") + ")"
                    if result["stock"] else "none (per-layer expert counts)") + "."]
        if result["scores"]:
            lines += ["", "| task | original MoE | compressed |", "|---|---:|---:|"]
            lines += [f"| {t} | {s['original']:.3f} | {s['compressed']:.3f} |" for t, s in result["scores"].items()]
            c = result["paired"]
            lines += ["", f"Pooled over tasks (n = {c['n']}, test split): compressed - original = {c['diff']:+.3f} "
                      f"[{c['diff_ci'][0]:+.3f}, {c['diff_ci'][1]:+.3f}], exact McNemar p = {c['p_value']:.2g}."]
        return "\n".join(lines)


STAGES.add("moe_compress", MoeCompressStage(), params=MoeCompressParams,
           summary="merge and compress an MoE's experts (MC-SMoE or a baseline); optionally evaluate against the original")
