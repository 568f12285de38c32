"""The recipe of a Branch-Train-MiX MoE built from one dense model (``expertkit moe build CONFIG OUT``).

Frozen, ``extra="forbid"``: a typo is an error naming the nearest key. Every field that changes
the weights is part of the recipe's fingerprint (:meth:`MoeBuildConfig.fingerprint_fields`), which
keys the build cache; ``save_every`` only changes how often progress is saved.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from expertkit.config import Config

#: Eight clusters of two suite tasks each: the default experts of the bundled MoE. Tasks were
#: grouped by family; bbc_topic (long articles), sort_words and gsm8k (evaluation only) are left
#: out so that every task is cheap to evaluate at n >= 300.
DEFAULT_CLUSTERS: tuple[dict[str, Any], ...] = (
    {"name": "arithmetic", "tasks": ("add_sub", "arith_mixed")},
    {"name": "numbers", "tasks": ("gcd", "solve_x")},
    {"name": "counting", "tasks": ("count_bits", "letter_count")},
    {"name": "sequences", "tasks": ("leg_count", "next_number")},
    {"name": "calendar", "tasks": ("leap_year", "weekday_offset")},
    {"name": "logic", "tasks": ("family_relation", "syllogism")},
    {"name": "strings", "tasks": ("spell_backward", "reverse_words")},
    {"name": "encoding", "tasks": ("sort_numbers", "to_binary")},
)


class ClusterSpec(Config):
    """One expert's data: a name and the suite tasks it is trained on."""

    name: str = Field(description="the expert's name (a folder name)", pattern=r"^[A-Za-z0-9_.-]+$")
    tasks: tuple[str, ...] = Field(min_length=1, description="suite tasks of this cluster (train split)")


class RouterSpec(Config):
    """How the routers are initialised and trained."""

    init: Literal["centroid", "zeros"] = Field(
        "centroid", description="centroid: rows from the mean hidden state of each cluster's prompts; zeros")
    init_prompts: int = Field(32, ge=1, description="prompts per cluster for the centroid initialisation")
    scale: float = Field(4.0, gt=0, description="norm of each centroid router row")
    steps: int = Field(40, ge=0, description="router training steps on the mixture of all clusters (0 = none)")
    train: Literal["router", "router+experts"] = Field(
        "router", description="what the mixture training updates: routers only, or routers and experts")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the routers")
    expert_lr: float = Field(1e-5, gt=0, description="AdamW learning rate of the experts (router+experts only)")
    aux_loss_coef: float = Field(0.01, ge=0, description="weight of the load-balancing loss (Switch / Mixtral)")
    batch_size: int = Field(8, ge=1, description="sequences per router training step")


class MoeBuildConfig(Config):
    """A sparse MoE made from a dense base in the Branch-Train-MiX way (see docs/moe.md)."""

    base: str = Field("smollm2-135m", description="the dense base model (bundled name or folder)")
    target: Literal["mixtral", "qwen2_moe"] = Field(
        "mixtral", description="mixtral (MixtralForCausalLM) or qwen2_moe (base MLP as the shared expert)")
    top_k: int = Field(2, ge=1, description="experts per token")
    clusters: tuple[ClusterSpec, ...] = Field(
        tuple(ClusterSpec(**c) for c in DEFAULT_CLUSTERS), min_length=2, description="one expert per cluster")
    general_text: Literal["bbc", "none"] = Field(
        "bbc", description="general text mixed into every expert's data: BBC News training articles, or none")
    general_fraction: float = Field(0.25, ge=0, lt=1, description="share of each batch that is general text")
    text_tokens: int = Field(32, ge=8, description="tokens per general-text sequence (about a task row's length)")
    expert_steps: int = Field(80, ge=1, description="AdamW steps per expert (full-rank MLP training)")
    expert_lr: float = Field(1e-4, gt=0, description="peak learning rate of expert training")
    batch_size: int = Field(8, ge=1, description="sequences per expert training step")
    router: RouterSpec = Field(default_factory=RouterSpec, description="router initialisation and training")
    seed: int = Field(0, description="seed of data order, sampling and initialisation")
    max_prompt_tokens: int = Field(256, ge=8, description="longer prompts keep their last tokens")
    save_every: int = Field(20, ge=0, description="save resumable progress every this many steps (0 = never)")

    @field_validator("clusters")
    @classmethod
    def _distinct(cls, clusters: tuple[ClusterSpec, ...]) -> tuple[ClusterSpec, ...]:
        names = [c.name for c in clusters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"cluster names must be distinct; repeated: {', '.join(dupes)}")
        return clusters

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoeBuildConfig:
        if self.top_k > len(self.clusters):
            raise ValueError(f"top_k ({self.top_k}) exceeds the number of experts ({len(self.clusters)})")
        return self

    def fingerprint_fields(self) -> dict[str, Any]:
        """Everything that changes the built weights (not ``save_every``)."""
        data = self.model_dump(mode="json")
        data.pop("save_every")
        return data

    def expert_fields(self, index: int) -> dict[str, Any]:
        """What changes expert ``index``'s weights (so that changing only the routers reuses the experts)."""
        keep = ("base", "general_text", "general_fraction", "text_tokens", "expert_steps", "expert_lr",
                "batch_size", "seed", "max_prompt_tokens")
        data = {k: v for k, v in self.model_dump(mode="json").items() if k in keep}
        return {**data, "cluster": self.clusters[index].model_dump(mode="json"), "index": index}
