"""Architecture registry and tensor-name grouping over the descriptors in ``weights/arch/*.yaml``.

The descriptor format (placeholders, fused experts, the ``routing`` section) is described in
:mod:`expertkit.weights.arch_spec`, which also holds the schema and the compiled
:class:`ArchDescriptor`. This module loads every descriptor once, finds the one for a model type,
and groups a checkpoint's tensor names by role (:func:`describe`).

Python here stays generic: no architecture is named in this file.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from expertkit.errors import ConfigError, unknown
from expertkit.weights.arch_spec import (  # re-exported: these were always importable from here
    ARCH_DIR,
    GROUPS,
    LAYER_GROUPS,
    ArchDescriptor,
    InferredArchitectureWarning,
    Routing,
    TensorRole,
    load_descriptor,
    parse_descriptor,
)

__all__ = [
    "ARCH_DIR", "GROUPS", "LAYER_GROUPS", "ArchDescriptor", "ArchSummary", "InferredArchitectureWarning",
    "Routing", "TensorRole", "classify", "describe", "descriptor_for", "generic_descriptor",
    "list_architectures", "load_descriptor", "parse_descriptor",
]


def _order(item: tuple[tuple[str | None, int], Any]) -> tuple[str, int]:
    return (item[0][0] or "", item[0][1])  # sort (stack, layer) keys; stack may be None


@functools.cache
def _registry() -> tuple[dict[str, ArchDescriptor], dict[str, ArchDescriptor], ArchDescriptor]:
    """(by name, by model_type, generic fallback), loaded once from :data:`ARCH_DIR`."""
    by_name: dict[str, ArchDescriptor] = {}
    by_type: dict[str, ArchDescriptor] = {}
    for path in sorted(ARCH_DIR.glob("[!_]*.yaml")):
        desc = load_descriptor(path)
        if desc.name in by_name:
            raise ConfigError(f"{path}: architecture '{desc.name}' is also defined in {by_name[desc.name].source}.")
        by_name[desc.name] = desc
        for model_type in desc.model_types:
            if model_type in by_type:
                raise ConfigError(f"{path}: model_type '{model_type}' is also covered by {by_type[model_type].source}.")
            by_type[model_type] = desc
    return by_name, by_type, load_descriptor(ARCH_DIR / "_generic.yaml")


def list_architectures() -> list[str]:
    """Names of the known architecture descriptors, sorted."""
    return sorted(_registry()[0])


def generic_descriptor() -> ArchDescriptor:
    """The fallback descriptor of generic name patterns (used when no descriptor fits)."""
    return _registry()[2]


def _model_type_of(obj: Any) -> str | None:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, Mapping):
        return obj.get("model_type")
    return getattr(obj, "model_type", None)  # a transformers PretrainedConfig


def descriptor_for(model_type_or_config: Any, *, strict: bool = False) -> ArchDescriptor | None:
    """The descriptor for a model type, descriptor name, config dict or ``PretrainedConfig``.

    Unknown (or a config without ``model_type``): None, or with ``strict=True`` an
    :class:`~expertkit.errors.UnknownNameError` naming the known model types.
    """
    by_name, by_type, _ = _registry()
    model_type = _model_type_of(model_type_or_config)
    found = (by_type.get(model_type) or by_name.get(model_type)) if model_type else None
    if found is None and strict:
        raise unknown("model_type", str(model_type), by_type)
    return found


def classify(name: str, arch: Any) -> TensorRole:
    """Classify one tensor name for ``arch`` (a descriptor, model type, or config); unknown arch raises."""
    desc = arch if isinstance(arch, ArchDescriptor) else descriptor_for(arch, strict=True)
    return desc.classify(name)


@dataclass(frozen=True)
class ArchSummary:
    """A checkpoint's tensor names grouped by role (see :func:`describe`)."""

    architecture: str  # descriptor name; "generic" when inferred
    model_type: str | None
    inferred: bool
    num_layers: int  # distinct layer indices, the most over stacks
    layers_per_stack: dict[str | None, int]
    num_experts: int  # per MoE layer (most found); 0 for dense models
    groups: dict[str, tuple[str, ...]]  # every group in GROUPS -> names, input order
    roles: dict[str, TensorRole]
    experts: dict[tuple[str | None, int], tuple[int, ...]]  # (stack, layer) -> expert indices

    @property
    def other(self) -> tuple[str, ...]:
        """Names no template recognised."""
        return self.groups["other"]

    def by_layer(self, group: str) -> dict[tuple[str | None, int], tuple[str, ...]]:
        """Names of ``group`` keyed by ``(stack, layer)`` (stack is None for decoder-only models)."""
        if group not in GROUPS:
            raise unknown("group", group, GROUPS)
        out: dict[tuple[str | None, int], list[str]] = {}
        for name in self.groups[group]:
            role = self.roles[name]
            if role.layer is not None:
                out.setdefault((role.stack, role.layer), []).append(name)
        return {k: tuple(v) for k, v in sorted(out.items(), key=_order)}


def describe(names: Iterable[str], config: Any = None, *, descriptor: ArchDescriptor | None = None) -> ArchSummary:
    """Group a checkpoint's tensor names by role.

    ``config`` is the ``config.json`` dict (or a ``PretrainedConfig``); it picks the
    descriptor via ``model_type`` and supplies the expert count for fused expert
    tensors. With no config or an unknown model type the grouping is inferred from
    generic patterns and an :class:`InferredArchitectureWarning` is emitted.
    """
    if config is not None and not isinstance(config, Mapping):
        config = config.to_dict() if hasattr(config, "to_dict") else None
    model_type = _model_type_of(config) if config else None
    desc = descriptor or (descriptor_for(config) if config else None)
    inferred = desc is None
    if desc is None:
        desc = generic_descriptor()
        warnings.warn(
            f"no architecture descriptor for model_type {model_type!r}"
            f"{' (no config given)' if config is None else ''}; the grouping of tensor names was "
            "inferred from generic patterns (layers.N / h.N / block.N, experts.N, gate/router, "
            f"embed/norm). Known model types: {', '.join(sorted(_registry()[1]))}.",
            InferredArchitectureWarning,
            stacklevel=2,
        )
    roles = {name: desc.classify(name) for name in names}
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    layers: dict[str | None, set[int]] = {}
    experts: dict[tuple[str | None, int], set[int]] = {}
    config_experts = desc.num_experts(config)
    for name, role in roles.items():
        groups[role.group].append(name)
        if role.layer is None:
            continue
        layers.setdefault(role.stack, set()).add(role.layer)
        if role.expert is not None:
            experts.setdefault((role.stack, role.layer), set()).add(role.expert)
        elif role.fused and config_experts:
            experts.setdefault((role.stack, role.layer), set()).update(range(config_experts))
    return ArchSummary(
        architecture=desc.name,
        model_type=model_type,
        inferred=inferred,
        num_layers=max((len(s) for s in layers.values()), default=0),
        layers_per_stack={k: len(v) for k, v in layers.items()},
        num_experts=max((len(s) for s in experts.values()), default=0),
        groups={g: tuple(v) for g, v in groups.items()},
        roles=roles,
        experts={k: tuple(sorted(v)) for k, v in sorted(experts.items(), key=_order)},
    )
