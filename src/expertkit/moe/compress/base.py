"""The expert-compression method protocol, the :data:`METHODS` registry and the shared merge maths.

A method is pure maths over one MoE layer: it receives a :class:`LayerInput` (the layer's experts
as SwiGLU matrices, read one expert at a time through an :class:`ExpertSource`, its routing
statistics and how many experts it may keep) and returns a :class:`LayerPlan`: which original
experts make each new expert, with which merge weights and whether members are aligned first, and
how tokens reach them:

* ``routing="group"`` (merging): the router keeps all its ``E`` rows; a token routed to any member
  of a group goes to the group's merged expert (top-k over the original experts, then each chosen
  expert's id is mapped to its group; two chosen members of one group add their weights);
* ``routing="prune"``: only the kept experts' router rows remain (top-k over the rows left).

Every method decides its groups from the routing statistics alone; the weights are touched only
when a plan's new experts are made, one at a time (:meth:`LayerPlan.expert`), so the streaming pass
holds one group's members at a time, never the whole layer (measured in docs/benchmarks.md).
:meth:`LayerPlan.stacked` makes them all at once, for in-memory use and tests.

Reading checkpoints, writing folders and the low-rank step live in :mod:`~expertkit.moe.compress.run`.
Every method registers itself where it is defined with :func:`compress_method` (one file each),
declaring a pydantic parameter model and the statistics it needs beyond the routing statistics
(``needs=("reap",)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from expertkit.errors import ConfigError
from expertkit.registry import Registry


class MethodParams(BaseModel):
    """Base of every method's parameter model: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


Expert = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate (I, H), up (I, H), down (H, I), float32


class ExpertSource(Protocol):
    """One MoE layer's routed experts, read one at a time (float32 SwiGLU matrices)."""

    num_experts: int

    def expert(self, e: int) -> Expert:
        """Expert ``e``'s ``(gate (I, H), up (I, H), down (H, I))``; a fresh read the caller may drop."""
        ...

    def part(self, e: int, part: str) -> torch.Tensor:
        """One of expert ``e``'s matrices: ``"gate"``, ``"up"`` (``(I, H)``) or ``"down"`` (``(H, I)``)."""
        ...


@dataclass
class StackedExperts:
    """An :class:`ExpertSource` over experts already in memory, stacked over the first dimension."""

    gate: torch.Tensor  # (E, I, H)
    up: torch.Tensor  # (E, I, H)
    down: torch.Tensor  # (E, H, I)

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.gate.shape[0])

    def expert(self, e: int) -> Expert:
        """Expert ``e`` (views of the stacks)."""
        return self.gate[e], self.up[e], self.down[e]

    def part(self, e: int, part: str) -> torch.Tensor:
        """One matrix of expert ``e`` (a view)."""
        return {"gate": self.gate, "up": self.up, "down": self.down}[part][e]


@dataclass
class LayerInput:
    """What a method sees of one MoE layer."""

    name: str  # layer name ("3")
    experts: ExpertSource  # the E routed experts, read one at a time
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
        return int(self.experts.num_experts)


@dataclass
class LayerPlan:
    """A method's answer for one layer: ``G`` new experts and how tokens reach them.

    New expert ``g`` is the weighted sum ``sum_i weights[g][i] * members[i]`` of ``groups[g]``'s
    experts (each member's neurons first permuted onto the group's first member, the anchor, when
    ``align``); a singleton group with weight 1 is its expert unchanged (pruning keeps experts so).
    """

    groups: list[list[int]]  # per new expert, the original experts it replaces (a singleton when kept)
    weights: list[np.ndarray]  # per new expert, the members' merge weights (float64, summing to 1)
    align: bool  # permute members onto the anchor before merging
    routing: Literal["group", "prune"]
    source: ExpertSource = field(repr=False)

    def group_map(self, num_experts: int) -> list[int]:
        """``[group of original expert e for e in range(E)]`` (group routing covers every expert)."""
        out = [-1] * num_experts
        for g, members in enumerate(self.groups):
            for e in members:
                out[e] = g
        if self.routing == "group" and -1 in out:
            raise ConfigError(f"group routing leaves expert {out.index(-1)} in no group.")
        return out

    def expert(self, g: int) -> Expert:
        """New expert ``g``, made now from its members (one member's matrices in memory at a time)."""
        return merged_expert(self.source, self.groups[g], self.weights[g], align=self.align)

    def parts(self, g: int) -> Iterator[torch.Tensor]:
        """New expert ``g``'s gate, up and down, one at a time (:func:`merged_parts`)."""
        return merged_parts(self.source, self.groups[g], self.weights[g], align=self.align)

    def stacked(self) -> Expert:
        """Every new expert, stacked: ``gate (G, I, H), up (G, I, H), down (G, H, I)`` (in-memory use)."""
        made = [self.expert(g) for g in range(len(self.groups))]
        return tuple(torch.stack([m[i] for m in made]) for i in range(3))  # type: ignore[return-value]


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
    if g != layer.keep or len(plan.weights) != g or any(not grp for grp in plan.groups) \
            or any(len(w) != len(grp) for w, grp in zip(plan.weights, plan.groups, strict=True)):
        raise ConfigError(f"method '{method}' returned {g} experts for layer {layer.name}; {layer.keep} were asked.")
    if len(set(members)) != len(members) or (plan.routing == "group" and members != list(range(layer.num_experts))):
        raise ConfigError(f"method '{method}': the groups of layer {layer.name} must be disjoint and, for group "
                          "routing, cover every expert.")


# ------------------------------------------------------------------ shared maths
def merge_weights(weights: np.ndarray | Sequence[float]) -> np.ndarray:
    """``w / sum(w)`` in float64; uniform weights when they sum to 0."""
    w = np.asarray(weights, dtype=np.float64)
    return np.full(len(w), 1.0 / len(w)) if float(w.sum()) <= 0 else w / w.sum()


def weighted_merge(tensors: torch.Tensor, weights: np.ndarray | Sequence[float]) -> torch.Tensor:
    """``sum_e w_e T_e / sum_e w_e`` over the first dimension; uniform weights when they sum to 0."""
    w = torch.as_tensor(merge_weights(weights), dtype=torch.float64)  # (n,)
    return torch.einsum("n,n...->...", w, tensors.double()).to(tensors.dtype)


def merged_expert(source: ExpertSource, members: list[int], weights: np.ndarray, *, align: bool) -> Expert:
    """``sum_i w_i members[i]`` (members after the first permuted onto it when ``align``), float32."""
    gate, up, down = merged_parts(source, members, weights, align=align)
    return gate, up, down


def merged_parts(source: ExpertSource, members: list[int], weights: np.ndarray, *,
                 align: bool) -> Iterator[torch.Tensor]:
    """:func:`merged_expert`'s gate, up and down, made one at a time as the caller asks for them.

    Streamed, not stacked (a measured choice, bench/moe_compress.py): each member is aligned, then
    each matrix is summed member by member into one float64 accumulator, so memory holds the
    anchor's matrices, one member's matrix and the accumulator, never the group stacked; a caller
    that drops each matrix before asking for the next (the compression pass) never holds two.
    """
    from expertkit.moe.compress.align import AnchorFeatures
    from expertkit.procmem import release_free_memory

    parts = ("gate", "up", "down")
    if len(members) == 1 and float(weights[0]) == 1.0:
        for part in parts:
            yield source.part(members[0], part)
        return
    perms: dict[int, torch.Tensor] = {}
    if align and len(members) > 1:
        anchor = AnchorFeatures(*source.expert(members[0]))
        for e in members[1:]:
            perms[e] = anchor.match(source.part(e, p) for p in parts)
            release_free_memory()  # the alignment's big temporaries (see expertkit.procmem)
        del anchor
    for part in parts:
        acc = None
        for e, w in zip(members, weights, strict=True):
            t = source.part(e, part)
            if e in perms:  # gate / up rows, down columns
                t = t[:, perms[e]] if part == "down" else t[perms[e]]
            if acc is None:
                acc = t.double().mul_(float(w))
            else:
                acc.add_(t, alpha=float(w))  # float32 into the float64 sum, computed in float64
            del t
        out = acc.to(torch.float32)  # type: ignore[union-attr]
        del acc
        yield out
        del out  # dropped here too before the next part is summed


def merge_groups(layer: LayerInput, groups: list[list[int]], *, weighting: Literal["frequency", "uniform"],
                 align: bool) -> LayerPlan:
    """A group-routing plan merging each group into one expert.

    The first member of a group is its anchor; with ``align`` every other member's intermediate
    neurons are first permuted to match the anchor's (:mod:`~expertkit.moe.compress.align`). The
    weights are the members' routing frequencies (``"frequency"``) or equal (``"uniform"``).
    """
    weights = [merge_weights(layer.frequencies[m] if weighting == "frequency" else np.ones(len(m))) for m in groups]
    return LayerPlan(groups, weights, align, "group", layer.experts)


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
    return LayerPlan([[e] for e in kept], [np.ones(1)] * len(kept), False, "prune", layer.experts)
