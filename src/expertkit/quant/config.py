"""The quantization config behind ``expertkit quantize CONFIG OUT`` and the ``quantize`` stage.

Frozen, ``extra="forbid"``: a misspelt key is an error naming the nearest one; a bad value (0 or 9 bits,
an unknown policy kind or structure, an unknown task) is one clear line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from expertkit.config import Config
from expertkit.quant.policy import Policy, UniformPolicy


class CalibrationSpec(Config):
    """The calibration set and expert balance."""

    text_blocks: int = Field(32, ge=0, description="blocks of BBC News validation text")
    seq_len: int = Field(128, ge=8, description="tokens per text block")
    tasks: tuple[str, ...] = Field((), description="suite tasks whose prompts join the calibration set")
    prompts_per_task: int = Field(16, ge=0, description="prompts of each task")
    split: Literal["validation", "train"] = Field("validation", description="split of the text and the prompts")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    min_tokens_per_expert: int = Field(128, ge=0, description="every expert's Hessian sees at least this many "
                                                              "tokens (0 = natural routing only)")
    layers_per_pass: int = Field(0, ge=0, description="collect Hessians for this many layers per calibration "
                                                      "pass, quantizing in between (0 = all in one pass)")
    seed: int = Field(0, description="seed of the prompt sample")

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        from expertkit.errors import UnknownNameError
        from expertkit.tasks.base import get_task

        for name in tasks:
            try:
                get_task(name)
            except UnknownNameError as exc:
                raise ValueError(str(exc)) from None
        return tasks


class GptqSpec(Config):
    """GPTQ's numerical options."""

    damp: float = Field(0.01, ge=0, description="dampening: this share of mean(diag H) is added to diag H")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    act_order: bool = Field(False, description="quantize columns in order of decreasing diag H (static groups)")


class QuantizeConfig(Config):
    """What to quantize, how, with which bit policy, and what to write."""

    model: str = Field("smollm2-135m", description="bundled name, model folder or hub id")
    method: Literal["gptq", "rtn"] = Field("gptq", description="gptq, or rtn (round to nearest)")
    group_size: int = Field(128, description="input columns per scale (-1: one per output channel); a matrix "
                                             "whose width it does not divide gets one scale per channel")
    symmetric: bool = Field(True, description="symmetric grid (no zero-points)")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="dtype of stored scales")
    clip_grid: int = Field(0, ge=0, description="ranges tried per group for its scale, from the full range down "
                                                "to 40% of it, keeping the least squared error (0: full range)")
    gptq: GptqSpec = Field(default_factory=GptqSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    policy: Policy = Field(default_factory=UniformPolicy, description="bits per matrix (see docs/quant.md)")
    formats: tuple[Literal["compressed", "dequantized", "gguf"], ...] = Field(
        ("compressed",), min_length=1, description="compressed (compressed-tensors folder), dequantized (plain HF "
                                                   "folder of the dequantized weights), gguf (llama.cpp file)")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError(f"group_size must be a positive number of columns or -1 (per channel), not {v}")
        return v
