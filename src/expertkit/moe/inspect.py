"""Check an MoE checkpoint's structure from its headers alone, before any weight is loaded.

:func:`moe_structure` reads tensor names and shapes (no data) and the config, and returns per MoE
layer the router tensor, the experts found and the shared-expert tensors. It refuses, naming the
tensors, a checkpoint whose router rows disagree with its expert count (the config's, or the
experts actually present), so that a broken MoE fails here with one line instead of deep inside
transformers' loader.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from expertkit.errors import CheckpointError
from expertkit.moe.routing import NotAnMoeError
from expertkit.weights.arch import InferredArchitectureWarning, describe, descriptor_for, list_architectures
from expertkit.weights.reader import Checkpoint


@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer of a checkpoint, from its headers."""

    layer: str
    router: str  # router weight tensor name
    experts: tuple[int, ...]  # expert indices present (all of range(E) for fused tensors)
    expert_tensors: int
    shared_tensors: int


def moe_structure(path: str | os.PathLike[str]) -> list[MoeLayer]:
    """The MoE layers of the checkpoint at ``path``; refuses dense, undescribed or inconsistent ones."""
    with Checkpoint(Path(path)) as ckpt:
        config = ckpt.config or {}
        shapes = {i.name: tuple(i.shape) for i in ckpt.infos()}
    desc = descriptor_for(config)
    model_type = config.get("model_type")
    if desc is None:
        raise NotAnMoeError(
            f"{path}: no architecture descriptor for model_type {model_type!r}; add weights/arch/<name>.yaml "
            f"with its expert and router templates and a 'routing' section (known: {', '.join(list_architectures())}).")
    if desc.routing is None:
        raise NotAnMoeError(f"{path}: model_type {model_type!r} ({desc.name}) is a dense architecture: it has no routers.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InferredArchitectureWarning)
        summary = describe(list(shapes), config)
    expected = desc.num_experts(config)
    routers = {k: [n for n in v if n.endswith(".weight")] for k, v in summary.by_layer("router").items()}
    experts = summary.by_layer("expert")
    shared = summary.by_layer("shared_expert")
    out = []
    for key in sorted(set(routers) | set(experts), key=lambda k: (k[0] or "", k[1])):
        name = f"{key[0]}.{key[1]}" if key[0] else str(key[1])
        if not routers.get(key):
            raise CheckpointError(f"{path}: layer {name} has experts ({experts[key][0]}, ...) but no router tensor.")
        router = routers[key][0]
        rows = shapes[router][0]
        present = summary.experts.get(key, ())
        if expected is not None and rows != expected:
            raise CheckpointError(
                f"{path}: router {router} has {rows} rows but the config declares {expected} experts "
                f"({'/'.join(desc.counts.experts)}); the checkpoint is inconsistent.")
        if present and len(present) != rows:
            first = experts[key][0]
            raise CheckpointError(
                f"{path}: router {router} has {rows} rows but layer {name} holds {len(present)} experts "
                f"(e.g. {first}); router rows and experts must match.")
        out.append(MoeLayer(name, router, tuple(present), len(experts.get(key, ())), len(shared.get(key, ()))))
    if not out:
        raise NotAnMoeError(f"{path}: a {desc.name} checkpoint without any router or expert tensor.")
    return out
