"""Architecture descriptors: which tensor names are embeddings, attention, MLP, experts, routers.

The knowledge lives in YAML files next to this module (``weights/arch/*.yaml``), one
per architecture. Each declares the HF ``model_type``\\ s it covers and, per *group*,
regex templates over tensor names. Templates may use placeholders:

* ``{layer}`` captures the layer (block) index, ``{expert}`` the expert index,
  ``{stack}`` ``encoder`` or ``decoder``;
* any name declared under ``vars`` (expanded in order; a var may use earlier ones).

An entry is either a template string or a mapping with ``pattern`` and optional
``module`` (a fixed module name), ``fan_in_fan_out`` (weight stored transposed as
``(in, out)``, e.g. GPT-2 Conv1D), ``expert_dim`` (the tensor holds every expert
stacked along this dimension: fused MoE experts), ``parts``/``part_dim`` (the
per-expert modules a fused tensor concatenates, in order along ``part_dim``). The
module name is the pattern's ``(?P<module>...)`` capture, else ``module``, else the
last name component before ``.weight``/``.bias``. The first matching entry wins, in
file order. Files whose name starts with ``_`` are not architectures: ``_generic.yaml``
is the fallback used, with a warning, when no descriptor covers a model type.

Python here stays generic: no architecture is named in this file.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from expertkit.config import StrictLoader
from expertkit.errors import ConfigError, suggest, unknown

GROUPS = (
    "embedding", "lm_head", "final_norm", "attention", "mlp", "norm",
    "expert", "shared_expert", "router", "position", "other",
)  # fmt: skip
LAYER_GROUPS = frozenset({"attention", "mlp", "norm", "expert", "shared_expert", "router"})
ARCH_DIR = Path(__file__).with_name("arch")
_BUILTIN_VARS = {"layer": r"(?P<layer>\d+)", "expert": r"(?P<expert>\d+)", "stack": r"(?P<stack>encoder|decoder)"}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")


class InferredArchitectureWarning(UserWarning):
    """The tensor grouping was inferred from generic name patterns, not a descriptor."""


@dataclass(frozen=True)
class TensorRole:
    """What one tensor is in its architecture.

    ``expert`` is the expert index of a per-expert tensor; ``expert_dim`` is the
    dimension that indexes experts in a fused tensor (``expert`` is then None).
    """

    group: str
    layer: int | None = None
    stack: str | None = None  # "encoder" / "decoder" for encoder-decoder models
    expert: int | None = None
    expert_dim: int | None = None
    module: str = ""
    fan_in_fan_out: bool = False  # weight stored as (in_features, out_features)
    parts: tuple[str, ...] = ()  # per-expert modules a fused tensor holds
    part_dim: int | None = None  # dimension along which ``parts`` are concatenated

    @property
    def fused(self) -> bool:
        """True for a tensor holding all experts stacked along ``expert_dim``."""
        return self.expert_dim is not None


# --------------------------------------------------------------------- YAML schema
class _Counts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: tuple[str, ...] = ()
    experts: tuple[str, ...] = ()
    top_k: tuple[str, ...] = ()


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pattern: str
    module: str | None = None
    fan_in_fan_out: bool = False
    expert_dim: int | None = None
    parts: tuple[str, ...] = ()
    part_dim: int | None = None


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    model_types: tuple[str, ...]
    description: str = ""
    vars: dict[str, str] = {}
    counts: _Counts = _Counts()
    groups: dict[str, list[Any]]


def _errors_of(exc: ValidationError, where: str, model: type[BaseModel]) -> list[str]:
    """Turn pydantic errors into one line each, suggesting the nearest key for typos."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            fields = _Counts.model_fields if loc.startswith("counts.") else model.model_fields
            key = str(err["loc"][-1])
            out.append(f"{where}: unknown key '{loc}'.{suggest(key, fields)}")
        else:
            out.append(f"{where}: '{loc}': {err['msg']}")
    return out


@dataclass(frozen=True)
class _Pattern:
    group: str
    regex: re.Pattern[str]
    entry: _Entry

    def role(self, match: re.Match[str], name: str) -> TensorRole:
        found, e = match.groupdict(), self.entry
        layer, expert = found.get("layer"), found.get("expert")  # digit strings or None
        return TensorRole(
            self.group, int(layer) if layer else None, found.get("stack"), int(expert) if expert else None,
            e.expert_dim, found.get("module") or e.module or _module_of(name), e.fan_in_fan_out, e.parts, e.part_dim,
        )


def _module_of(name: str) -> str:
    """Last name component before a trailing ``.weight``/``.bias``."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-1]


def _order(item: tuple[tuple[str | None, int], Any]) -> tuple[str, int]:
    return (item[0][0] or "", item[0][1])  # sort (stack, layer) keys; stack may be None


def _first_int(config: Mapping[str, Any] | None, keys: Iterable[str]) -> int | None:
    for key in keys:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


@dataclass(frozen=True)
class ArchDescriptor:
    """One architecture's tensor-name templates, compiled. Build with :func:`load_descriptor`."""

    name: str
    model_types: tuple[str, ...]
    description: str
    patterns: tuple[_Pattern, ...] = field(repr=False)
    counts: _Counts = field(repr=False)
    source: str = ""

    def classify(self, name: str) -> TensorRole:
        """The :class:`TensorRole` of a tensor name (group ``"other"`` when no template matches)."""
        for pattern in self.patterns:
            match = pattern.regex.fullmatch(name)
            if match:
                return pattern.role(match, name)
        return TensorRole("other", module=_module_of(name))

    def matches(self, name: str) -> list[str]:
        """Groups of every template that matches ``name`` (for checking descriptors: expect one)."""
        return [p.group for p in self.patterns if p.regex.fullmatch(name)]

    def num_layers(self, config: Mapping[str, Any] | None) -> int | None:
        """Layer count from a config dict (first of ``counts.layers`` present), else None."""
        return _first_int(config, self.counts.layers)

    def num_experts(self, config: Mapping[str, Any] | None) -> int | None:
        """Expert count from a config dict (first of ``counts.experts`` present), else None."""
        return _first_int(config, self.counts.experts)

    def top_k(self, config: Mapping[str, Any] | None) -> int | None:
        """Experts per token from a config dict (first of ``counts.top_k`` present), else None."""
        return _first_int(config, self.counts.top_k)


# --------------------------------------------------------------------- loading
def _expand(template: str, table: Mapping[str, str], where: str, errors: list[str]) -> str:
    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in table:
            errors.append(f"{where}: unknown placeholder '{{{key}}}'.{suggest(key, table)}")
            return m.group(0)
        return table[key]

    return _PLACEHOLDER.sub(sub, template)


def _compile(group: str, entry: _Entry, table: Mapping[str, str], where: str, errors: list[str]):
    before = len(errors)
    expanded = _expand(entry.pattern, table, where, errors)
    if len(errors) > before:
        return None
    try:
        regex = re.compile(expanded)
    except re.error as exc:
        errors.append(f"{where}: invalid regex {entry.pattern!r} ({exc}).")
        return None
    captures = regex.groupindex
    if group in LAYER_GROUPS and "layer" not in captures:
        errors.append(f"{where}: a '{group}' pattern must capture the layer index with {{layer}}.")
    if group == "expert" and ("expert" in captures) == (entry.expert_dim is not None):
        errors.append(
            f"{where}: an 'expert' pattern needs exactly one of {{expert}} (one tensor per expert) "
            "or expert_dim (all experts fused in one tensor)."
        )
    if group != "expert" and (entry.expert_dim is not None or entry.parts):
        errors.append(f"{where}: expert_dim and parts are only allowed in the 'expert' group.")
    if entry.part_dim is not None and not entry.parts:
        errors.append(f"{where}: part_dim is set but parts is empty.")
    return _Pattern(group, regex, entry)


def parse_descriptor(data: Any, source: str = "<descriptor>") -> ArchDescriptor:
    """Validate a descriptor mapping (as read from YAML) and compile its templates.

    Raises :class:`~expertkit.errors.ConfigError` listing every problem found.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a descriptor must be a mapping, found {type(data).__name__}.")
    try:
        spec = _Spec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("invalid architecture descriptor:\n  " + "\n  ".join(_errors_of(exc, source, _Spec))) from None
    errors: list[str] = []
    table = dict(_BUILTIN_VARS)
    for key, value in spec.vars.items():
        if key in _BUILTIN_VARS:
            errors.append(f"{source}: vars.{key} redefines a built-in placeholder.")
        table[key] = _expand(value, table, f"{source}: vars.{key}", errors)
    patterns = []
    for group, entries in spec.groups.items():
        if group not in GROUPS or group == "other":
            errors.append(f"{source}: unknown group '{group}'.{suggest(group, GROUPS[:-1])} Groups: {', '.join(GROUPS[:-1])}.")
            continue
        for i, raw in enumerate(entries):
            where = f"{source}: groups.{group}[{i}]"
            try:
                entry = _Entry(pattern=raw) if isinstance(raw, str) else _Entry.model_validate(raw)
            except ValidationError as exc:
                errors.extend(_errors_of(exc, where, _Entry))
                continue
            compiled = _compile(group, entry, table, where, errors)
            if compiled is not None:
                patterns.append(compiled)
    if errors:
        raise ConfigError("invalid architecture descriptor:\n  " + "\n  ".join(errors))
    return ArchDescriptor(spec.name, spec.model_types, spec.description, tuple(patterns), spec.counts, source)


def load_descriptor(path: str | Path) -> ArchDescriptor:
    """Read and validate one descriptor YAML file."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)  # noqa: S506 - safe subclass
    except OSError as exc:
        raise ConfigError(f"cannot read architecture descriptor {path}: {exc}.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc}).") from None
    return parse_descriptor(data, str(path))


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
