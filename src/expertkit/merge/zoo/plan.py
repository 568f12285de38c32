"""The zoo plan: a readable YAML file that ``expertkit zoo plan`` writes and ``zoo build`` reads.

The user may edit it between the two: move a member to another cluster, change a cluster's
``method``/``params``/``merge`` list, switch the mixture ``kind`` (``ffn``, ``model``, ``none``).
Everything is validated when the plan is loaded (unknown keys name the nearest valid key; every
problem is reported at once). Fields marked *informational* (similarity matrix, scores, trials,
incompatibility explanations) are written for the reader and ignored by ``build``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from expertkit.config import Config, load_config
from expertkit.fileio import write_atomic

HEADER = """\
# expertkit zoo plan (Model-GLUE). Edit, then build: expertkit zoo build THIS_FILE OUT
#  - clusters[].merge: the members merged into the cluster's representative (greedy selection);
#  - clusters[].method / params / weights: a merge method (expertkit merge methods) or "single";
#  - mixture.kind: ffn (Mixtral / Qwen2-MoE experts), model (a router picks one model per prompt) or none.
# score, trials, similarity.matrix and incompatible are informational; build ignores them.
"""


class MemberSpec(Config):
    """One zoo member."""

    name: str
    path: str
    kind: Literal["model", "adapter"]
    base: str | None = Field(None, description="adapters: the base model folder")
    tasks: list[str] = Field(default_factory=list, description="tasks the member was trained for")


class ClusterSpec(Config):
    """One cluster of mergeable members and how it is merged into its representative."""

    name: str
    members: list[str] = Field(min_length=1, description="every member placed in this cluster")
    merge: list[str] | None = Field(None, description="members merged (default: all members)")
    base: str | None = Field(None, description="common base folder, needed by task-vector methods")
    method: str = Field("linear", description="merge method name, or 'single' (one member kept as is)")
    params: dict[str, Any] = Field(default_factory=dict, description="merge method parameters")
    weights: dict[str, float] | None = Field(None, description="per-member merge weights (default 1)")
    tasks: list[str] = Field(default_factory=list, description="tasks the representative serves")
    score: float | None = Field(None, description="informational: validation score of the choice")
    trials: list[str] = Field(default_factory=list, description="informational: candidates tried")

    @property
    def merged(self) -> list[str]:
        """The members that go into the merge."""
        return list(self.merge) if self.merge is not None else list(self.members)


class SimilaritySpec(Config):
    """How clusters were found (informational apart from documenting the choice)."""

    metric: str = "cosine"
    group: str = "all"
    threshold: float | str = "auto"
    cut: float | None = Field(None, description="informational: the distance cut used (None: no cut)")
    matrix: dict[str, dict[str, float]] = Field(default_factory=dict, description="informational")


class MixtureSpec(Config):
    """How the cluster representatives are combined."""

    kind: Literal["ffn", "model", "none"] = "ffn"
    clusters: list[str] | None = Field(None, description="clusters mixed (default: all)")
    top_k: int = Field(1, ge=1, description="ffn: experts per token")
    prompts_per_task: int = Field(16, ge=1, description="router initialisation prompts per task")
    router_train_steps: int = Field(0, ge=0, description="ffn: brief router training steps (0: none)")
    router_lr: float = Field(1e-2, gt=0, description="ffn: router training learning rate")
    embedder: str = Field("minilm", description="model: sentence embedder of the sequence router")


class ValidationSpec(Config):
    """Where strategy selection scored its candidates."""

    split: Literal["validation", "test"] = "validation"
    n: int = Field(50, ge=1)
    budget: int = Field(12, ge=1, description="evaluations per cluster")
    search: Literal["grid", "cmaes"] = Field(
        "grid", description="coefficient search: the method grid, or CMA-ES over per-member weights")


class ZooPlan(Config):
    """A whole zoo plan (see the module docstring)."""

    version: Literal[1] = 1
    seed: int = 0
    tasks: list[str] = Field(min_length=1)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    similarity: SimilaritySpec = Field(default_factory=SimilaritySpec)
    members: list[MemberSpec] = Field(min_length=1)
    incompatible: list[str] = Field(default_factory=list, description="informational")
    clusters: list[ClusterSpec] = Field(min_length=1)
    mixture: MixtureSpec = Field(default_factory=MixtureSpec)

    @model_validator(mode="after")
    def _consistent(self) -> ZooPlan:
        problems = []
        known = [m.name for m in self.members]
        if len(set(known)) != len(known):
            problems.append("two members share a name")
        placed: dict[str, str] = {}
        cluster_names = [c.name for c in self.clusters]
        if len(set(cluster_names)) != len(cluster_names):
            problems.append("two clusters share a name")
        for c in self.clusters:
            for m in c.members:
                if m not in known:
                    problems.append(f"cluster {c.name}: unknown member '{m}' (members: {', '.join(known)})")
                elif m in placed:
                    problems.append(f"member '{m}' is in clusters {placed[m]} and {c.name}; place it once")
                placed.setdefault(m, c.name)
            for m in c.merged:
                if m not in c.members:
                    problems.append(f"cluster {c.name}: merge lists '{m}', which is not one of its members")
            if c.method != "single":
                from expertkit.merge import METHODS

                if c.method not in METHODS:
                    from expertkit.errors import suggest

                    problems.append(f"cluster {c.name}: unknown merge method '{c.method}'."
                                    f"{suggest(c.method, [*METHODS.names(), 'single'])} Known: "
                                    f"{', '.join(METHODS.names())}, single")
            if c.method == "single" and len(c.merged) != 1:
                problems.append(f"cluster {c.name}: method 'single' needs exactly one member in merge")
        unplaced = [m for m in known if m not in placed]
        if unplaced:
            problems.append(f"members in no cluster: {', '.join(unplaced)} (every member must be placed)")
        for c in self.mixture.clusters or []:
            if c not in cluster_names:
                problems.append(f"mixture: unknown cluster '{c}' (clusters: {', '.join(cluster_names)})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def member(self, name: str) -> MemberSpec:
        """The member called ``name``."""
        return next(m for m in self.members if m.name == name)

    def mixed_clusters(self) -> list[ClusterSpec]:
        """The clusters that go into the mixture, in plan order."""
        names = self.mixture.clusters
        return [c for c in self.clusters if names is None or c.name in names]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def plan_text(plan: ZooPlan) -> str:
    """The plan as commented YAML."""
    data = _clean(plan.model_dump(mode="python"))
    return HEADER + yaml.safe_dump(data, sort_keys=False, width=110, allow_unicode=True)


def save_plan(plan: ZooPlan, path: str | os.PathLike[str]) -> Path:
    """Write the plan atomically as YAML; returns the path."""
    write_atomic(path, plan_text(plan))
    return Path(path)


def load_plan(path: str | os.PathLike[str]) -> ZooPlan:
    """Read and validate a plan file (every problem reported at once)."""
    return load_config(ZooPlan, path)
