"""Architecture descriptors as data: the YAML schema, its validation, and the compiled descriptor.

The registry and tensor-name grouping are in :mod:`expertkit.weights.arch`; this module holds what a
descriptor *is*. The original description of the format follows.

Architecture descriptors: which tensor names are embeddings, attention, MLP, experts, routers.

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

An optional ``routing`` section describes an MoE's *modules* as the model holds them in memory
(templates over module names, same placeholders), so routing statistics, compression and
quantization find routers without naming classes:

* ``router``: the module whose forward returns the routing decision (a tuple);
* ``experts``: the module that holds one layer's experts;
* ``logits`` / ``selected``: positions in the router's output tuple of the router logits
  ``(tokens, E)`` and of the chosen experts; ``selected_format`` is ``indices`` (``(tokens, k)``
  expert ids) or ``one_hot`` (a ``(..., E)`` dispatch mask, e.g. Switch, where capacity can drop
  tokens);
* ``expert_call``: how the experts module is called, ``topk`` (``experts(hidden (N, H), index
  (N, k), weights (N, k))``) or ``dispatch`` (``experts(hidden (N, H), one_hot (N, 1, E), weights
  (N, 1))``); used to evaluate one expert alone on chosen tokens;
* ``score``: ``softmax`` or ``sigmoid``, how router logits become routing probabilities.

Python here stays generic: no architecture is named in this file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from expertkit.config import StrictLoader
from expertkit.errors import ConfigError, suggest

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


class _Routing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    router: str
    experts: str
    logits: int = 0
    selected: int = 2
    selected_format: Literal["indices", "one_hot"] = "indices"
    expert_call: Literal["topk", "dispatch"] = "topk"
    score: Literal["softmax", "sigmoid"] = "softmax"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    model_types: tuple[str, ...]
    description: str = ""
    vars: dict[str, str] = {}
    counts: _Counts = _Counts()
    groups: dict[str, list[Any]]
    routing: _Routing | None = None


@dataclass(frozen=True)
class Routing:
    """Where an MoE routes, in memory: router and experts module-name templates (see the module docstring)."""

    router: re.Pattern[str]
    experts: re.Pattern[str]
    logits: int
    selected: int
    selected_format: str  # "indices" | "one_hot"
    expert_call: str  # "topk" | "dispatch"
    score: str  # "softmax" | "sigmoid"

    def modules(self, model: Any) -> dict[tuple[str | None, int], tuple[Any, Any, str]]:
        """``{(stack, layer): (router module, experts module, router name)}`` of a loaded model, in layer order.

        A layer whose router has no experts module beside it raises a :class:`ConfigError`.
        """
        routers: dict[tuple[str | None, int], tuple[str, Any]] = {}
        experts: dict[tuple[str | None, int], Any] = {}
        for name, module in model.named_modules():
            if m := self.router.fullmatch(name):
                routers[_key(m)] = (name, module)
            elif m := self.experts.fullmatch(name):
                experts[_key(m)] = module
        missing = sorted(set(routers) - set(experts), key=lambda k: (k[0] or "", k[1]))
        if missing:
            raise ConfigError(f"router {routers[missing[0]][0]} has no experts module matching "
                              f"{self.experts.pattern!r} in the same layer.")
        return {k: (routers[k][1], experts[k], routers[k][0])
                for k in sorted(routers, key=lambda k: (k[0] or "", k[1]))}


def _key(match: re.Match[str]) -> tuple[str | None, int]:
    found = match.groupdict()
    return found.get("stack"), int(found["layer"])


def _errors_of(exc: ValidationError, where: str, model: type[BaseModel]) -> list[str]:
    """Turn pydantic errors into one line each, suggesting the nearest key for typos."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            nested = {"counts": _Counts, "routing": _Routing}.get(loc.split(".")[0]) if "." in loc else None
            fields = nested.model_fields if nested else model.model_fields
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
    routing: Routing | None = field(default=None, repr=False)

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
    routing = _compile_routing(spec.routing, table, source, errors) if spec.routing else None
    if errors:
        raise ConfigError("invalid architecture descriptor:\n  " + "\n  ".join(errors))
    return ArchDescriptor(spec.name, spec.model_types, spec.description, tuple(patterns), spec.counts, source, routing)


def _compile_routing(spec: _Routing, table: Mapping[str, str], source: str, errors: list[str]) -> Routing | None:
    compiled = []
    for key in ("router", "experts"):
        where = f"{source}: routing.{key}"
        before = len(errors)
        expanded = _expand(getattr(spec, key), table, where, errors)
        if len(errors) > before:
            continue
        try:
            regex = re.compile(expanded)
        except re.error as exc:
            errors.append(f"{where}: invalid regex {getattr(spec, key)!r} ({exc}).")
            continue
        if "layer" not in regex.groupindex:
            errors.append(f"{where}: the template must capture the layer index with {{layer}}.")
        compiled.append(regex)
    if spec.logits == spec.selected:
        errors.append(f"{source}: routing.logits and routing.selected name the same output position.")
    if len(compiled) < 2:
        return None
    return Routing(compiled[0], compiled[1], spec.logits, spec.selected, spec.selected_format,
                   spec.expert_call, spec.score)


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


