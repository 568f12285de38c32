"""The expert-compression method protocol, the :data:`METHODS` registry and the shared merge maths.

A method is pure maths over one MoE layer: it receives a :class:`LayerInput` (the layer's experts
as SwiGLU matrices, its routing statistics and how many experts it may keep) and returns a
:class:`LayerPlan`: which original experts make each new expert, the new experts' weights, and how
tokens reach them:

* ``routing="group"`` (merging): the router keeps all its ``E`` rows; a token routed to any member
  of a group goes to the group's merged expert (top-k over the original experts, then each chosen
  expert's id is mapped to its group; two chosen members of one group add their weights);
* ``routing="prune"``: only the kept experts' router rows remain (top-k over the rows left).

Reading checkpoints, writing folders and the low-rank step live in :mod:`~expertkit.moe.compress.run`.
Every method registers itself where it is defined with :func:`compress_method` (one file each),
declaring a pydantic parameter model and the statistics it needs beyond the routing statistics
(``needs=("reap",)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from expertkit.errors import ConfigError
from expertkit.registry import Registry


class MethodParams(BaseModel):
    """Base of every method's parameter model: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass
class LayerInput:
    """What a method sees of one MoE layer."""

    name: str  # layer name ("3")
    gate: torch.Tensor  # (E, I, H) float32
    up: torch.Tensor  # (E, I, H)
    down: torch.Tensor  # (E, H, I)
    router: torch.Tensor  # (E, H)
    frequencies: np.ndarray  # (E,) share of routing decisions
    logit_similarity: np.ndarray  # (E, E) cosine of router-logit columns
    output_mean: np.ndarray | None  # (E, H) mean output of each expert on the same sampled tokens
    reap: np.ndarray | None  # (E,) router-weighted output norm (REAP), when the method needs it
    keep: int  # experts this layer may keep
    rng: np.random.Generator

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.gate.shape[0])


@dataclass
class LayerPlan:
    """A method's answer for one layer: ``G`` new experts and how tokens reach them."""

    groups: list[list[int]]  # per new expert, the original experts it replaces (a singleton when kept)
    gate: torch.Tensor  # (G, I, H)
    up: torch.Tensor  # (G, I, H)
    down: torch.Tensor  # (G, H, I)
    routing: Literal["group", "prune"]

    def group_map(self, num_experts: int) -> list[int]:
        """``[group of original expert e for e in range(E)]`` (group routing covers every expert)."""
        out = [-1] * num_experts
        for g, members in enumerate(self.groups):
            for e in members:
                out[e] = g
        if self.routing == "group" and -1 in out:
            raise ConfigError(f"group routing leaves expert {out.index(-1)} in no group.")
        return out


@dataclass(frozen=True)
class CompressMethod:
    """A registered method: the function and its contract."""

    name: str
    fn: Callable[[LayerInput, MethodParams], LayerPlan]
    params: type[MethodParams]
    needs: frozenset[str] = frozenset()  # extra statistics: "reap"

    def __call__(self, layer: LayerInput, params: MethodParams) -> LayerPlan:
        plan = self.fn(layer, params)
        _check_plan(self.name, layer, plan)
        return plan


METHODS: Registry[CompressMethod] = Registry("MoE compression method")


def compress_method(name: str, *, params: type[MethodParams], paper: str, summary: str,
                    needs: Sequence[str] = ()) -> Callable[[Callable[..., LayerPlan]], Callable[..., LayerPlan]]:
    """Decorator registering ``fn(LayerInput, params) -> LayerPlan`` in :data:`METHODS` as ``name``."""

    def deco(fn: Callable[..., LayerPlan]) -> Callable[..., LayerPlan]:
        METHODS.add(name, CompressMethod(name, fn, params, frozenset(needs)), params=params, paper=paper,
                    summary=summary)
        return fn

    return deco


def _check_plan(method: str, layer: LayerInput, plan: LayerPlan) -> None:
    g = len(plan.groups)
    members = sorted(e for grp in plan.groups for e in grp)
    if g != layer.keep or plan.gate.shape[0] != g or any(not grp for grp in plan.groups):
        raise ConfigError(f"method '{method}' returned {g} experts for layer {layer.name}; {layer.keep} were asked.")
    if len(set(members)) != len(members) or (plan.routing == "group" and members != list(range(layer.num_experts))):
        raise ConfigError(f"method '{method}': the groups of layer {layer.name} must be disjoint and, for group "
                          "routing, cover every expert.")


# ------------------------------------------------------------------ shared maths
def weighted_merge(tensors: torch.Tensor, weights: np.ndarray | Sequence[float]) -> torch.Tensor:
    """``sum_e w_e T_e / sum_e w_e`` over the first dimension; uniform weights when they sum to 0."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float64)  # (n,)
    w = torch.full_like(w, 1.0 / len(w)) if float(w.sum()) <= 0 else w / w.sum()
    return torch.einsum("n,n...->...", w, tensors.double()).to(tensors.dtype)


def merge_groups(layer: LayerInput, groups: list[list[int]], *, weighting: Literal["frequency", "uniform"],
                 align: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge each group into one expert: ``(gate, up, down)`` stacked over groups.

    The first member of a group is its anchor; with ``align`` every other member's intermediate
    neurons are first permuted to match the anchor's (:func:`~expertkit.moe.compress.align.align_to`).
    """
    from expertkit.moe.compress.align import align_to, permute_expert

    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for members in groups:
        anchor = members[0]
        parts = []
        for e in members:
            g, u, d = layer.gate[e], layer.up[e], layer.down[e]  # (I, H), (I, H), (H, I)
            if align and e != anchor:
                perm = align_to(layer.gate[anchor], layer.up[anchor], layer.down[anchor], g, u, d)
                g, u, d = permute_expert(g, u, d, perm)
            parts.append((g, u, d))
        w = layer.frequencies[members] if weighting == "frequency" else np.ones(len(members))
        out.append(tuple(weighted_merge(torch.stack([p[i] for p in parts]), w) for i in range(3)))  # type: ignore[arg-type]
    return tuple(torch.stack([o[i] for o in out]) for i in range(3))  # type: ignore[return-value]


def dominant_groups(layer: LayerInput) -> list[list[int]]:
    """M-SMoE's grouping: the ``keep`` most frequently routed experts are dominant (ties: lower id);
    every other expert joins the dominant one whose router-logit column it resembles most. Each group
    lists its dominant expert first, then members in id order."""
    order = sorted(range(layer.num_experts), key=lambda e: (-layer.frequencies[e], e))
    dominant = order[: layer.keep]
    groups = {d: [d] for d in dominant}
    for e in range(layer.num_experts):
        if e in groups:
            continue
        sim = layer.logit_similarity[e, dominant]
        groups[dominant[int(np.argmax(sim))]].append(e)
    return [groups[d] for d in dominant]


def prune_plan(layer: LayerInput, scores: np.ndarray) -> LayerPlan:
    """Keep the ``keep`` experts with the highest ``scores`` (ties: lower id), in id order; prune routing."""
    kept = sorted(sorted(range(layer.num_experts), key=lambda e: (-scores[e], e))[: layer.keep])
    return LayerPlan([[e] for e in kept], layer.gate[kept].clone(), layer.up[kept].clone(), layer.down[kept].clone(),
                     "prune")
