"""Configuration base: frozen pydantic models that refuse unknown keys.

* :class:`Config` is the base of every expertkit config: frozen, ``extra="forbid"``.
* :func:`load_yaml` reads a YAML file and turns syntax errors, and duplicate keys (which
  PyYAML would silently resolve to the last one), into one clear
  :class:`~expertkit.errors.ConfigError` with the line number. YAML merge keys
  (``<<: *anchor``) work as YAML defines them: the mapping's own keys override merged ones.
* Configs cross a trust boundary, so reading one is bounded: at most :data:`MAX_CONFIG_BYTES`
  bytes, :data:`MAX_NODES` nodes with every alias counted as the size of what it stands for
  (an "alias bomb" of a few hundred bytes would otherwise expand to billions of values), and
  :data:`MAX_DEPTH` levels of nesting. Error messages quote at most :data:`MAX_QUOTE` characters
  of a value and list at most :data:`MAX_PROBLEMS` problems.
* :func:`validate` validates data against a config class and reports *every*
  error of the file at once, each with its location (``stages[1].lr``) and, for
  an unknown key, the nearest valid key (never a key that is declared only to be refused:
  see :data:`REFUSED`).
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

#: largest config file read (bytes). The biggest real configs (merge configs with per-tensor
#: parameters, zoo plans of large zoos) are tens of kB; PyYAML parses about 1 MB per second.
MAX_CONFIG_BYTES = 1 << 20
#: most YAML nodes in a config, counting each alias as the whole subtree it repeats
MAX_NODES = 100_000
#: deepest nesting of mappings and lists (PyYAML recurses once per level)
MAX_DEPTH = 64
#: longest quoted value in an error message, and most problems listed for one file
MAX_QUOTE = 60
MAX_PROBLEMS = 20
#: ``json_schema_extra`` of a field declared only to refuse it with a good message (e.g. a
#: mergekit key expertkit does not support): never proposed as the nearest key of a typo
REFUSED = {"expertkit_refused": True}


class Config(BaseModel):
    """Base of every expertkit config: immutable, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate keys (PyYAML keeps the last one silently) and
    bounds alias expansion and nesting (see the module docstring)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._expanded = 0  # nodes composed so far, an alias counted as the size of its anchor
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size of its subtree
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose as PyYAML does, counting expanded nodes and nesting depth."""
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        start = self._expanded
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels", mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias:
            size = self._sizes.get(id(node))
            if size is None:
                raise yaml.composer.ComposerError(None, None, "an alias refers to the node that contains it", mark)
            self._expanded += size
        else:
            self._expanded += 1
            self._sizes[id(node)] = self._expanded - start
            if isinstance(node, yaml.MappingNode):
                node.own_pairs = list(node.value)  # before merge keys are flattened into node.value
        if self._expanded > MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_NODES:,} values once aliases are expanded", mark)
        return node

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Resolve merge keys as the YAML merge-key spec says: the mapping's own keys override
        merged ones, and of a merged list the earlier mappings override the later ones.

        (PyYAML 6.0.4 keeps the *last* of a list's mappings: ``<<: [{a: 1}, {a: 2}]`` gives 2.)
        """
        merged: list[tuple[Any, Any]] = []
        own: list[tuple[Any, Any]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                if key_node.tag == "tag:yaml.org,2002:value":
                    key_node.tag = "tag:yaml.org,2002:str"
                own.append((key_node, value_node))
                continue
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in reversed(sources):  # later ones first, so that earlier ones override them
                if not isinstance(source, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"a merge key '<<' takes a mapping or a list of mappings, not a {source.id}",
                        source.start_mark)
                self.flatten_mapping(source)
                merged.extend(source.value)
        node.value = merged + own  # a dict built from these pairs keeps the last value of a key


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _strict_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    merges = 0
    for key_node, _ in getattr(node, "own_pairs", node.value):
        if key_node.tag == _MERGE_TAG:  # '<<': merged by construct_mapping, own keys win
            merges += 1
            if merges > 1:
                raise yaml.constructor.ConstructorError(None, None, "duplicate merge key '<<'", key_node.start_mark)
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{_quote(key)}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def _quote(value: Any, limit: int = MAX_QUOTE) -> str:
    """``repr``-like text of ``value`` cut to ``limit`` characters (never the whole of a huge input)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def _short_repr(value: Any) -> str:
    """``repr(value)`` for an error message, cut to :data:`MAX_QUOTE` characters, computed without
    rendering all of a huge value (a list of a million items)."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > MAX_QUOTE:
        kind = type(value).__name__
        return f"{kind} of {len(value):,} items"
    text = repr(value)
    return text if len(text) <= MAX_QUOTE else f"{text[:MAX_QUOTE]}... ({len(text):,} characters)"


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing, too large or invalid file is a :class:`ConfigError`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; pass a config file.")
    with path.open("rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB ({path.stat().st_size:,} bytes); "
                          "a config is a short YAML file, not data.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a config is a YAML text file.") from None
    try:
        return yaml.load(text, Loader=StrictLoader) or {}  # noqa: S506 - safe subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {_quote(problem, 200)}") from None


def format_loc(loc: tuple[Any, ...]) -> str:
    """Render a pydantic location tuple as ``a.b[0].c``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _quote(str(part))
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
    """The valid keys of the model found at ``loc`` (the last element is the bad key); fields
    marked :data:`REFUSED` are left out."""
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
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            if not extra.get("expertkit_refused"):
                keys.add(f.alias or name)
    return sorted(keys)


def error_lines(exc: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[str]:
    """One readable line per pydantic error, with nearest-key suggestions for typos."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = format_loc(prefix + loc)
        if err["type"] == "extra_forbidden":
            bad = _quote(str(loc[-1]))
            hint = suggest(str(loc[-1]), allowed_keys(model, loc))
            lines.append(f"{where}: unknown key '{bad}'.{hint}")
        elif err["type"] == "missing":
            lines.append(f"{where}: required field is missing.")
        elif err["type"] == "value_error":
            lines.append(f"{where}: {_quote(err['msg'].removeprefix('Value error, '), 400)}")
        else:
            lines.append(f"{where}: {_quote(err['msg'], 400)} (got {_short_repr(err.get('input'))}).")
    return lines


def validate(model: type[C], data: Any, *, source: str = "config") -> C:
    """Validate ``data`` against ``model``, raising one ConfigError listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(source, error_lines(exc, model)) from None


def config_error(source: str, lines: list[str]) -> ConfigError:
    """A ConfigError for several problems of one file (the first :data:`MAX_PROBLEMS` listed)."""
    n = len(lines)
    head = f"{source}: {n} problem{'s' if n != 1 else ''}"
    shown = lines[:MAX_PROBLEMS] + ([f"... and {n - MAX_PROBLEMS} more"] if n > MAX_PROBLEMS else [])
    return ConfigError(head + ":\n  - " + "\n  - ".join(shown))


def load_config(model: type[C], path: str | Path) -> C:
    """Read a YAML file and validate it against ``model``."""
    return validate(model, load_yaml(path), source=str(path))


def default_text(field: Any) -> str:
    """How a listing shows a pydantic field's default: ``required``, or ``default <repr>`` (a
    ``default_factory`` is called: ``default {}``, never ``PydanticUndefined``)."""
    if field.is_required():
        return "required"
    return f"default {_quote(field.get_default(call_default_factory=True))}"
