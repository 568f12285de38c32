"""The ``merge`` stage: merge the run's LoRA experts into one model with a registered merge method.

The experts of earlier ``train_experts`` stages are the inputs, read as base + adapter directly
(no merged copy of any expert is written); the base model is the base of task-vector methods.
The merged model is a Hugging Face folder at ``<run>/merged/<label>/`` (label: the method name by
default). A later ``evaluate`` stage evaluates it beside the base and the experts.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field, field_validator, model_validator

from expertkit.config import Config
from expertkit.pipeline.config import STAGES
from expertkit.pipeline.context import RunContext


class MergeStageParams(Config):
    """Parameters of the ``merge`` stage."""

    method: str = Field("ties", description="merge method (expertkit merge methods)")
    experts: list[str] | None = Field(None, description="experts (task names) to merge; default: all of the run's")
    weights: list[float] | None = Field(None, description="one weight per expert; default 1 each")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters, e.g. density")
    label: str | None = Field(None, pattern=r"^[\w.-]+$", description="output folder and report name; default: method")
    dtype: str | None = Field(None, description="output dtype (default: the base's)")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from expertkit.merge.config import known_method

        return known_method(v)

    @model_validator(mode="after")
    def _check(self) -> MergeStageParams:
        from expertkit.errors import ConfigError
        from expertkit.merge.core import get_method, resolve_params

        method = get_method(self.method)
        if method.stats:
            raise ValueError(f"method '{self.method}' needs calibration statistics; the merge stage supports "
                             "methods without them (use expertkit merge with stats: for fisher/regmean)")
        try:
            resolve_params(method, self.params)
        except ConfigError as exc:
            raise ValueError(str(exc).replace("\n", " ")) from None
        if self.weights is not None and self.experts is not None and len(self.weights) != len(self.experts):
            raise ValueError("give one weight per expert")
        return self


class MergeStage:
    """Merge the run's LoRA experts (base + adapter, streamed) into one model folder."""

    def run(self, ctx: RunContext, params: MergeStageParams) -> dict[str, Any]:
        """Build a merge config over the experts and run the streaming executor."""
        from expertkit.errors import ConfigError
        from expertkit.merge.config import MergeConfig
        from expertkit.merge.executor import run_merge

        experts: dict[str, dict[str, Any]] = {}
        for res in ctx.earlier("train_experts"):
            experts.update(res["experts"])
        chosen = params.experts or list(experts)
        missing = [e for e in chosen if e not in experts]
        if missing or not chosen:
            raise ConfigError(f"merge: experts {missing or '(none)'} were not trained earlier in the run; "
                              f"trained: {', '.join(experts) or 'none'}. Add a train_experts stage before it.")
        weights = params.weights or [1.0] * len(chosen)
        if len(weights) != len(chosen):
            raise ConfigError(f"merge: {len(weights)} weights for {len(chosen)} experts; give one per expert.")
        base = str(ctx.model_path())
        label = params.label or params.method
        config = MergeConfig.model_validate({
            "merge_method": params.method, "base_model": base, "parameters": params.params, "seed": ctx.seed,
            "out_dtype": params.dtype,
            "models": [{"model": str(ctx.run_dir / experts[e]["path"]), "parameters": {"weight": w}}
                       for e, w in zip(chosen, weights, strict=True)]})
        out = ctx.run_dir / "merged" / label
        started = time.perf_counter()
        run_merge(config, out, overwrite=True)
        return {"label": label, "method": params.method, "experts": chosen, "weights": weights,
                "params": params.params, "path": str(out.relative_to(ctx.run_dir)),
                "seconds": round(time.perf_counter() - started, 1)}

    def report(self, result: dict[str, Any]) -> str:
        """What was merged, how, and where the model is."""
        shown = ", ".join(f"{e} ({w:g})" for e, w in zip(result["experts"], result["weights"], strict=True))
        params = ", ".join(f"{k}={v}" for k, v in result["params"].items()) or "defaults"
        return (f"`{result['method']}` ({params}) of {shown} into `{result['path']}` "
                f"in {result['seconds']} s (LoRA experts read as base + adapter, streamed tensor by tensor).")


STAGES.add("merge", MergeStage(), params=MergeStageParams,
           summary="merge the run's LoRA experts into one model with a registered merge method")
