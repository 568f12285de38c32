"""Configuration base: frozen pydantic models that refuse unknown keys.

* :class:`Config` is the base of every expertkit config: frozen, ``extra="forbid"``.
* :func:`load_yaml` reads a YAML file and turns syntax errors, and duplicate keys (which
  PyYAML would silently resolve to the last one), into one clear
  :class:`~expertkit.errors.ConfigError` with the line number.
* :func:`validate` validates data against a config class and reports *every*
  error of the file at once, each with its location (``stages[1].lr``) and, for
  an unknown key, the nearest valid key.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from expertkit.errors import ConfigError, suggest

C = TypeVar("C", bound=BaseModel)


class Config(BaseModel):
    """Base of every expertkit config: immutable, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _strict_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or a syntax error is a :class:`ConfigError`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader) or {}  # noqa: S506 - safe subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from exc


def format_loc(loc: tuple[Any, ...]) -> str:
    """Render a pydantic location tuple as ``a.b[0].c``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic model classes reachable from a type annotation (through unions, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType) or origin in (list, tuple, dict, set, frozenset):
        found: list[type[BaseModel]] = []
        for arg in get_args(annotation):
            found += _models_in(arg)
        return found
    return []


def allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the model found at ``loc`` (the last element is the bad key)."""
    current: list[type[BaseModel]] = [model]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for m in current:
            if part in m.model_fields:
                nxt += _models_in(m.model_fields[part].annotation)
        # a union tag (e.g. a discriminator value) in the location: keep the candidates
        current = nxt or current
    keys: set[str] = set()
    for m in current:
        for name, f in m.model_fields.items():
            keys.add(f.alias or name)
    return sorted(keys)


def error_lines(exc: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[str]:
    """One readable line per pydantic error, with nearest-key suggestions for typos."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = format_loc(prefix + loc)
        if err["type"] == "extra_forbidden":
            bad = str(loc[-1])
            hint = suggest(bad, allowed_keys(model, loc))
            lines.append(f"{where}: unknown key '{bad}'.{hint}")
        elif err["type"] == "missing":
            lines.append(f"{where}: required field is missing.")
        elif err["type"] == "value_error":
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{where}: {err['msg']} (got {err.get('input')!r}).")
    return lines


def validate(model: type[C], data: Any, *, source: str = "config") -> C:
    """Validate ``data`` against ``model``, raising one ConfigError listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(source, error_lines(exc, model)) from None


def config_error(source: str, lines: list[str]) -> ConfigError:
    """A ConfigError for several problems of one file."""
    n = len(lines)
    head = f"{source}: {n} problem{'s' if n != 1 else ''}"
    return ConfigError(head + ":\n  - " + "\n  - ".join(lines))


def load_config(model: type[C], path: str | Path) -> C:
    """Read a YAML file and validate it against ``model``."""
    return validate(model, load_yaml(path), source=str(path))
