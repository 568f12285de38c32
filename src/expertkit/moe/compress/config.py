"""The recipe of ``expertkit moe compress CONFIG OUT`` (frozen; a misspelt key names the nearest one).

```yaml
model: path/to/moe            # an MoE folder (e.g. the bundled MoE: expertkit moe build)
method: msmoe                 # msmoe | average | random_group | hcsmoe | prune_frequency | reap
params: {}                    # the method's parameters (see docs/moe_compress.md)
experts_per_layer: 4          # kept experts per layer, on average over layers
allocation: adaptive          # adaptive (one global frequency threshold) | uniform
min_experts: null             # fewest experts a layer keeps (default: the model's top-k)
calibration: {tasks: null, n: 32, split: validation, sample_tokens: 16}   # tasks: default the MoE's own
lowrank: {keep: null, sparse_share: 0.2}    # the C step: keep 0.4 = 40% of each merged matrix's parameters
kd: {steps: 0, lr: 1.0e-4, batch_size: 8, temperature: 2.0}                # distillation from the original
stock: true                   # also write OUT/stock (a stock transformers model) where one can express it
seed: 0
```
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from expertkit.config import Config


class Calibration(Config):
    """Prompts whose routing guides the compression."""

    tasks: tuple[str, ...] | None = Field(None, description="suite tasks; default: the MoE's build clusters' tasks")
    n: int = Field(32, ge=1, description="prompts per task")
    split: Literal["train", "validation"] = Field("validation", description="split of the prompts (never test)")
    sample_tokens: int = Field(16, ge=0, description="tokens per batch and layer for expert-output statistics")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")


class LowRank(Config):
    """The C step: every merged expert matrix as low rank plus a structured sparse residual."""

    keep: float | None = Field(None, gt=0, le=1, description="share of each expert matrix's parameters kept (none: skip)")
    sparse_share: float = Field(0.2, ge=0, le=1, description="share of the kept parameters given to sparse columns")


class Distill(Config):
    """Knowledge-distillation recovery with the original MoE as teacher."""

    steps: int = Field(0, ge=0, description="AdamW steps (0: no recovery)")
    lr: float = Field(1e-4, gt=0, description="learning rate of the experts")
    batch_size: int = Field(8, ge=1, description="sequences per step")
    temperature: float = Field(2.0, gt=0, description="softmax temperature of the KL loss")
    general_fraction: float = Field(0.25, ge=0, lt=1, description="share of each batch that is BBC News text")
    text_tokens: int = Field(32, ge=8, description="tokens per text piece")


class CompressConfig(Config):
    """How to merge and compress the experts of an MoE (see docs/moe_compress.md)."""

    model: str = Field(description="the MoE to compress (folder or bundled name)")
    method: str = Field("msmoe", description="compression method (expertkit.moe.compress.METHODS)")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    experts_per_layer: float = Field(4, gt=0, description="experts kept per layer, on average")
    allocation: Literal["adaptive", "uniform"] = Field("adaptive", description="how the budget spreads over layers")
    min_experts: int | None = Field(None, ge=1, description="fewest experts per layer (default: top-k)")
    calibration: Calibration = Field(default_factory=Calibration, description="calibration prompts")
    lowrank: LowRank = Field(default_factory=LowRank, description="the C step")
    kd: Distill = Field(default_factory=Distill, description="distillation recovery")
    stock: bool = Field(True, description="also write OUT/stock where a stock transformers class expresses the result")
    seed: int = Field(0, description="seed of prompts, random grouping and distillation data")

    @field_validator("method")
    @classmethod
    def _known(cls, name: str) -> str:
        from expertkit.moe.compress import METHODS

        METHODS.entry(name)  # unknown: one line listing the methods, nearest first
        return name

    def method_params(self) -> Any:
        """The method's parameter model, validated (errors name the method)."""
        from expertkit.config import validate
        from expertkit.moe.compress import METHODS

        return validate(METHODS.get(self.method).params, self.params, source=f"method '{self.method}' params")
