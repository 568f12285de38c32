"""An MoE checkpoint on disk, one layer's experts at a time, found from the architecture descriptor.

:class:`MoeCheckpoint` reads the routed experts of one MoE layer as SwiGLU matrices (gate and up
``(I, H)``, down ``(H, I)``), one expert at a time, plus the router's tensors (every router tensor whose first
dimension is the expert count: the ``(E, H)`` weight, DeepSeek-V3's ``(E,)`` score bias), and names
the tensors of a rewritten layer. Which on-disk module is the gate, the up and the down projection
is data: the descriptor's fused in-memory entry with two ``parts`` holds ``[gate, up]`` in that order
(transformers' ``gate_up_proj``), the entry with one part holds ``down``. Nothing here names an
architecture.

Shared experts (Qwen2-MoE, DeepSeek) and dense layers are not routed experts and pass unchanged.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from expertkit.errors import CheckpointError
from expertkit.moe.routing import LayerKey, NotAnMoeError, layer_name
from expertkit.weights.arch import InferredArchitectureWarning, describe, descriptor_for, list_architectures
from expertkit.weights.reader import Checkpoint

PARTS = ("gate", "up", "down")
FACTOR_SUFFIXES = ("lowrank_a", "lowrank_b", "sparse_values", "sparse_index")


@dataclass
class LayerExperts:
    """One MoE layer's routed experts on disk, read one expert (or one matrix) at a time as float32:
    an :class:`~expertkit.moe.compress.base.ExpertSource` for the streaming pass."""

    ckpt: Checkpoint
    names: dict[int, dict[str, str]]  # expert -> part -> tensor name

    @property
    def num_experts(self) -> int:
        """E."""
        return len(self.names)

    def part(self, e: int, part: str) -> torch.Tensor:
        """Expert ``e``'s ``gate`` / ``up`` ``(I, H)`` or ``down`` ``(H, I)``, read now."""
        return self.ckpt.read(self.names[e][part], dtype=torch.float32)

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert ``e``'s ``(gate, up, down)``, read now."""
        return self.part(e, "gate"), self.part(e, "up"), self.part(e, "down")


def router_weight(router: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(E, H)``: the router's weight matrix among a layer's router tensors."""
    return next(t for t in router.values() if t.dim() == 2)


@dataclass
class LayerNames:
    """Where one MoE layer lives on disk."""

    key: LayerKey
    experts: dict[int, dict[str, str]]  # expert -> {"gate"/"up"/"down": tensor name}
    router: list[str]  # router tensors (first dimension = experts)
    other: list[str] = field(default_factory=list)  # expert-group tensors we do not rewrite (none so far)


def part_modules(desc: Any) -> dict[str, str]:
    """``{"gate": on-disk module, "up": ..., "down": ...}`` from the descriptor's fused entries."""
    found: dict[str, str] = {}
    for pattern in desc.patterns:
        parts = tuple(pattern.entry.parts)
        if pattern.group != "expert" or not parts:
            continue
        if len(parts) == 2:
            found.setdefault("gate", parts[0])
            found.setdefault("up", parts[1])
        elif len(parts) == 1:
            found.setdefault("down", parts[0])
    if set(found) != set(PARTS):
        raise NotAnMoeError(
            f"{desc.name}: the descriptor does not say which expert modules are the SwiGLU gate, up and down "
            "projections (fused 'gate_up_proj' with parts [gate, up] and 'down_proj' with parts [down]); "
            "expert compression needs SwiGLU experts.")
    return found


class MoeCheckpoint:
    """The MoE layers of a checkpoint folder, read lazily layer by layer."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.config: dict[str, Any] = ckpt.config or {}
        self.descriptor = desc = descriptor_for(self.config)
        model_type = self.config.get("model_type")
        if desc is None:
            raise NotAnMoeError(f"{ckpt.path}: no architecture descriptor for model_type {model_type!r} "
                                f"(known: {', '.join(list_architectures())}); add weights/arch/<name>.yaml.")
        if desc.routing is None:
            raise NotAnMoeError(f"{ckpt.path}: model_type {model_type!r} ({desc.name}) is a dense architecture: "
                                "it has no experts to merge or compress. Give a mixture-of-experts model.")
        modules = part_modules(desc)
        by_module = {m: p for p, m in modules.items()}
        shapes = {i.name: tuple(i.shape) for i in ckpt.infos()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InferredArchitectureWarning)
            summary = describe(list(shapes), self.config)
        self.num_experts = int(desc.num_experts(self.config) or 0)
        self.top_k = int(desc.top_k(self.config) or 1)
        self.layers: dict[LayerKey, LayerNames] = {}
        for key, names in summary.by_layer("expert").items():
            experts: dict[int, dict[str, str]] = {}
            for name in names:
                role = summary.roles[name]
                if role.fused:
                    raise CheckpointError(
                        f"{ckpt.path}: expert tensor {name} holds all experts stacked (the in-memory layout); "
                        "save the model with save_pretrained (one tensor per expert) and compress that folder.")
                part = by_module.get(role.module)
                if part is None:
                    raise CheckpointError(f"{ckpt.path}: expert tensor {name} is none of the SwiGLU parts "
                                          f"{sorted(by_module)}; its experts cannot be merged.")
                experts.setdefault(int(role.expert), {})[part] = name  # type: ignore[arg-type]
            router = [n for n in summary.by_layer("router").get(key, ())
                      if shapes[n] and shapes[n][0] == len(experts)]
            if not router:
                raise CheckpointError(f"{ckpt.path}: MoE layer {layer_name(key)} has experts but no router tensor.")
            incomplete = [e for e, p in experts.items() if set(p) != set(PARTS)]
            if incomplete or sorted(experts) != list(range(len(experts))):
                raise CheckpointError(f"{ckpt.path}: MoE layer {layer_name(key)} has incomplete or non-contiguous "
                                      f"experts {sorted(experts)}; the checkpoint is inconsistent.")
            self.layers[key] = LayerNames(key, experts, router)
        if not self.layers:
            raise NotAnMoeError(f"{ckpt.path}: a {desc.name} checkpoint without routed expert tensors.")
        self.shapes = shapes

    def moe_names(self) -> set[str]:
        """Every tensor this module rewrites (experts and routers of MoE layers)."""
        out: set[str] = set()
        for layer in self.layers.values():
            out.update(n for parts in layer.experts.values() for n in parts.values())
            out.update(layer.router)
        return out

    def experts(self, key: LayerKey) -> LayerExperts:
        """The layer's routed experts, to be read one at a time (nothing is read here)."""
        return LayerExperts(self.ckpt, self.layers[key].experts)

    def read_router(self, key: LayerKey) -> dict[str, torch.Tensor]:
        """The layer's router tensors, float32: on-disk name -> ``(E, H)`` weight / ``(E,)`` bias."""
        return {n: self.ckpt.read(n, dtype=torch.float32) for n in self.layers[key].router}

    def dtype(self, key: LayerKey) -> torch.dtype:
        """The stored dtype of the layer's expert tensors."""
        first = self.layers[key].experts[0]["gate"]
        return self.ckpt.info(first).dtype

    def templates(self) -> dict[str, Any]:
        """Name templates of the rewritten tensors: ``{"gate"|"up"|"down": "...{layer}...{expert}...{suffix}",
        "router": [...{layer}...]}`` (see :func:`name_template`)."""
        first = next(iter(self.layers.values()))
        out: dict[str, Any] = {p: name_template(self.descriptor, first.experts[0][p]) for p in PARTS}
        out["router"] = [name_template(self.descriptor, n) for n in first.router]
        return out


def name_template(desc: Any, name: str) -> str:
    """``name`` with its layer and expert indices replaced by ``{layer}`` / ``{expert}`` and a trailing
    ``.weight`` by ``.{suffix}`` (router tensors keep their last component); the positions come from
    the descriptor's ``{layer}`` / ``{expert}`` captures."""
    for pattern in desc.patterns:
        match = pattern.regex.fullmatch(name)
        if not match:
            continue
        spans = sorted((match.span(g), g) for g in ("layer", "expert")
                       if g in match.groupdict() and match.group(g) is not None)
        out, pos = "", 0
        for (start, end), group in spans:
            out += name[pos:start] + "{" + group + "}"
            pos = end
        out += name[pos:]
        if "{expert}" in out:
            out = re.sub(r"\.weight$", ".{suffix}", out)
        return out
    raise CheckpointError(f"{name} is not a tensor name of {desc.name}.")
