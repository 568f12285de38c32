"""The ``quantize`` stage: post-training quantization of the run's model (or its built MoE).

The stage's parameters are those of a quantization config (:class:`~expertkit.quant.config.QuantizeConfig`),
with ``model`` defaulting to the output of an earlier ``moe_build`` stage, else the run's model. The
quantized model is written to ``<run>/quantized/<label>/`` in the formats asked for; with
``perplexity_blocks > 0`` held-out perplexity (BBC News test blocks) is measured before and after.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from expertkit.pipeline.config import STAGES
from expertkit.pipeline.context import RunContext
from expertkit.quant.config import QuantizeConfig


class QuantizeParams(QuantizeConfig):
    """Parameters of the ``quantize`` stage: a quantization config whose model defaults to the run's."""

    model: str | None = Field(None, description="model to quantize; default: an earlier moe_build's MoE, "  # type: ignore[assignment]
                                                "else the run's model")
    label: str = Field("model", pattern=r"^[\w.-]+$", description="output folder name under quantized/")
    perplexity_blocks: int = Field(0, ge=0, description="held-out text blocks of 128 tokens scored before and "
                                                        "after (0 = skip)")


class QuantizeStage:
    """Quantize a model with a bit policy and store it."""

    def run(self, ctx: RunContext, params: QuantizeParams) -> dict[str, Any]:
        """Quantize, write ``<run>/quantized/<label>/``, optionally measure perplexity."""
        from expertkit.models import load_model
        from expertkit.quant.run import quantize_model
        from expertkit.quant.storage import write_outputs

        built = ctx.earlier("moe_build")
        model = params.model or (str(ctx.run_dir / built[-1]["path"]) if built else str(ctx.config.model))
        config = QuantizeConfig.model_validate({**params.model_dump(exclude={"label", "perplexity_blocks"}),
                                                "model": model})
        before = None
        if params.perplexity_blocks:
            before = _perplexity(load_model(model), params.perplexity_blocks)
        result = quantize_model(config)
        out = ctx.run_dir / "quantized" / params.label
        paths = write_outputs(result, out, overwrite=True)
        report = result.report()
        after = _perplexity(result.loaded, params.perplexity_blocks) if params.perplexity_blocks else None
        return {"model": model, "path": str(out.relative_to(ctx.run_dir)), "formats": sorted(paths),
                "bits": report["bits"], "method": config.method, "policy": config.policy.kind,
                "tokens_per_expert": report.get("tokens_per_expert", {}), "errors": report["quantization"]["by_group"],
                "seconds": report["seconds"], "perplexity": {"before": before, "after": after}}

    def report(self, result: dict[str, Any]) -> str:
        """Bits achieved, per-structure errors against RTN, tokens per expert, perplexity."""
        b = result["bits"]
        target = f" (target {b['target_bits']})" if b["target_bits"] is not None else ""
        lines = [f"`{result['model']}` quantized by {result['method']} with a `{result['policy']}` policy into "
                 f"`{result['path']}` ({', '.join(result['formats'])}): {b['achieved_bits']:.4f} bits per weight, "
                 f"scales and zero-points counted{target}.", "",
                 "| structure | matrices | relative layer error | RTN's |", "|---|---:|---:|---:|"]
        for group, e in result["errors"].items():
            lines.append(f"| {group} | {e['n']} | {e['error']:.4f} | {e['rtn_error']:.4f} |")
        if result["tokens_per_expert"]:
            seen = [r + a for v in result["tokens_per_expert"].values() for r, a in zip(v["routed"], v["added"], strict=True)]
            added = sum(sum(v["added"]) for v in result["tokens_per_expert"].values())
            lines += ["", f"Calibration tokens per expert: {min(seen)} to {max(seen)} ({added} added for balance)."]
        p = result["perplexity"]
        if p["before"] is not None:
            lines += ["", f"Held-out perplexity: {p['before']:.3f} before, {p['after']:.3f} after."]
        return "\n".join(lines)


def _perplexity(loaded: Any, blocks: int) -> float:
    from expertkit.tasks.perplexity import block_nll, heldout_blocks, perplexity

    return perplexity(block_nll(loaded.model, heldout_blocks(loaded.tokenizer, n_blocks=blocks)))


STAGES.add("quantize", QuantizeStage(), params=QuantizeParams,
           summary="post-training quantization (GPTQ/RTN) with a bit policy and an exact bit budget; stored "
                   "as compressed-tensors")
