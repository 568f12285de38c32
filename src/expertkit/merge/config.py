"""The merge config: a YAML schema that accepts mergekit's common configs.

Accepted (mergekit's keys): ``merge_method``, ``base_model``, ``models`` (each ``model`` with
optional ``parameters``), ``slices`` (each with ``sources`` of ``model`` + ``layer_range`` +
optional ``parameters``, optional ``base_model`` and ``parameters``), top-level ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source`` (``base``, ``union`` or a model), ``name``,
``chat_template``. Refused with an explanation: ``modules``, ``residual_weight``,
``tokenizer:`` (mergekit's token-embedding surgery). expertkit adds ``seed`` (DARE masks),
``max_shard_size``, and per model ``stats`` (a safetensors file of Fisher diagonals or Gram
matrices for ``fisher`` / ``regmean``).

A parameter value (a *setting*) is, as in mergekit:

* a scalar: ``density: 0.5``;
* a list of numbers: a gradient over depth. Layer ``l`` of a slice of ``L`` layers gets
  ``t = l / (L - 1)`` and the value interpolated linearly between the list's evenly spaced points;
  tensors outside the layers (embeddings, final norm, lm_head) get ``t = 0``;
* a list of ``{filter, value}`` (or one such mapping): the first entry whose ``filter`` matches the
  tensor wins; ``filter`` matches when it is ``*``, absent, a substring of the tensor name
  (mergekit's rule) or, an expertkit extension, the tensor's group in the architecture descriptor
  (``attention``, ``mlp``, ``embedding``, ``norm``, ``lm_head``...).

Model references: a folder, a bundled name, ``BASE+ADAPTER`` or an adapter folder (see
:mod:`expertkit.merge.sources`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from pydantic import AliasChoices, Field, field_validator, model_validator

from expertkit.config import REFUSED, Config, load_config

Scalar = Union[bool, int, float, str]  # noqa: UP007 - pydantic keeps the order of a Union



def known_method(name: str) -> str:
    """``name`` when it is a registered merge method; a ValueError naming the nearest one otherwise.

    For pydantic validators: the ValueError is reported beside the file's other errors.
    """
    from expertkit.errors import UnknownNameError
    from expertkit.merge.methods import METHODS

    try:
        METHODS.entry(name)
    except UnknownNameError as exc:
        raise ValueError(str(exc)) from None
    return name

#: mergekit options that change nothing in expertkit's arithmetic (accepted and ignored).
IGNORED_PARAMS = frozenset({"int8_mask"})


def param_names(method: Any) -> set[str]:
    """Every key that names one of ``method``'s parameters: field names and their aliases."""
    names: set[str] = set()
    for name, f in method.params.model_fields.items():
        names |= {name, *(a for a in (f.alias, f.serialization_alias) if a)}
        choices = f.validation_alias.choices if isinstance(f.validation_alias, AliasChoices) else [f.validation_alias]
        names |= {c for c in choices if isinstance(c, str)}
    return names


def shared_key_problems(method: Any, keys: set[str]) -> list[str]:
    """Problems with top-level or slice ``parameters`` keys: names ``method`` does not have."""
    allowed = param_names(method) | {"weight"} | IGNORED_PARAMS
    shown = sorted({f.serialization_alias or f.alias or n for n, f in method.params.model_fields.items()} | {"weight"})
    return [f"unknown key '{k}'.{_suggest(k, shown)} Parameters of merge method '{method.name}': {', '.join(shown)}."
            for k in sorted(keys - allowed)]


def model_key_problems(method: Any, keys: set[str]) -> list[str]:
    """Problems with keys set on one model: ones the method would not use per model (a typo, or a
    parameter that must be set for all models at once)."""
    allowed = {"weight"} | set(method.per_model) | IGNORED_PARAMS
    fields, per = param_names(method), sorted(allowed - IGNORED_PARAMS)
    return [f"'{k}' of merge method '{method.name}' cannot differ per model; set it under the top-level "
            "(or slice) parameters." if k in fields else
            f"unknown per-model parameter '{k}'.{_suggest(k, per)} Per-model parameters of '{method.name}': "
            f"{', '.join(per)}." for k in sorted(keys - allowed)]


def _suggest(key: str, names: Any) -> str:
    from expertkit.errors import suggest

    return suggest(key, sorted(names))


class ConditionalSetting(Config):
    """A value that applies to tensors matching ``filter``."""

    value: Union[Scalar, list[Scalar]]  # noqa: UP007
    filter: str | None = None


Setting = Union[ConditionalSetting, list[ConditionalSetting], Scalar, list[Scalar]]  # noqa: UP007
Parameters = dict[str, Setting]

DTYPES = ("float32", "float16", "bfloat16", "float64")


class InputModel(Config):
    """One input model (mergekit's ``InputModelDefinition``)."""

    model: str = Field(description="folder, bundled name, BASE+ADAPTER, or adapter folder")
    parameters: Parameters | None = None
    stats: str | None = Field(None, description="safetensors file of Fisher diagonals / Gram matrices")


class InputSlice(Config):
    """One source of an output slice: a model's layers ``[start, end)``."""

    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(Config):
    """A run of output layers merged from sources with the same number of layers."""

    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None
    residual_weight: float | None = Field(None, json_schema_extra=REFUSED)

    @model_validator(mode="after")
    def _lengths(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"every source of a slice must span the same number of layers, got {sorted(lengths)}")
        if self.residual_weight is not None:
            raise ValueError("residual_weight is not supported by expertkit; remove it")
        return self


class MergeConfig(Config):
    """A merge: method, inputs, parameters, dtypes. Validate with :func:`load_merge_config`."""

    merge_method: str = Field(description="a registered merge method (expertkit merge methods)")
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None
    dtype: str | None = Field(None, description="dtype the inputs are read in (default: as stored)")
    out_dtype: str | None = Field(None, description="dtype of the output (default: dtype, else the base's)")
    tokenizer_source: str | None = Field(None, description="base, union, or a model reference")
    name: str | None = None
    chat_template: str | None = None
    seed: int = Field(0, description="seed of random methods (DARE): per tensor, mixed with the tensor name")
    max_shard_size: str | int = Field("2GB", description="bytes per output shard")
    modules: Any = Field(None, json_schema_extra=REFUSED)
    tokenizer: Any = Field(None, json_schema_extra=REFUSED)

    @field_validator("merge_method")
    @classmethod
    def _method(cls, v: str) -> str:
        return known_method(v)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"dtype '{v}' is not supported; use one of {', '.join(DTYPES)}")
        return v

    @model_validator(mode="after")
    def _inputs(self) -> MergeConfig:
        if self.modules is not None:
            raise ValueError("'modules' (per-module merges of multimodal models) is not supported by expertkit; "
                             "use 'models' or 'slices'")
        if self.tokenizer is not None:
            raise ValueError("'tokenizer:' (mergekit's token surgery) is not supported; use tokenizer_source "
                             "(base, union or a model): vocabularies that differ only by added tokens are aligned "
                             "(docs/merge.md, 'Tokenizers: what is supported and why')")
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        problems = self.parameter_problems()
        if problems:
            raise ValueError(" ".join(problems))
        return self

    def parameter_problems(self) -> list[str]:
        """Every parameter key the method does not take, where it is set (checked without weights;
        the executor checks the values per tensor)."""
        from expertkit.merge.methods import METHODS

        method = METHODS.get(self.merge_method)
        top = set(self.parameters or {})
        out = [f"parameters: {p}" for p in shared_key_problems(method, top)]
        for i, m in enumerate(self.models or []):
            out += [f"model {i + 1}: {p}" for p in model_key_problems(method, set(m.parameters or {}) - top)]
        for j, sl in enumerate(self.slices or []):
            mine = set(sl.parameters or {})
            out += [f"slice {j + 1} parameters: {p}" for p in shared_key_problems(method, mine)]
            for i, src in enumerate(sl.sources):
                keys = set(src.parameters or {}) - mine - top
                out += [f"slice {j + 1}, model {i + 1}: {p}" for p in model_key_problems(method, keys)]
        return out

    def input_refs(self) -> list[str]:
        """Every model reference in the config (base first), without duplicates."""
        refs = [self.base_model] if self.base_model else []
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            refs += [x.model for x in s.sources] + ([s.base_model] if s.base_model else [])
        return list(dict.fromkeys(r for r in refs if r))


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file (every problem reported at once); loads no weights."""
    return load_config(MergeConfig, path)


# ------------------------------------------------------------------- settings
def _interpolate(values: list[Scalar], t: float) -> Scalar:
    """A gradient's value at ``t`` in [0, 1]: linear between evenly spaced points (numbers only)."""
    if not values:
        raise ValueError("a gradient needs at least one value")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _matches(filt: str | None, name: str, group: str | None) -> bool:
    return filt in (None, "*") or filt == group or filt in name


def evaluate_setting(setting: Setting, name: str, *, t: float = 0.0, group: str | None = None) -> Any:
    """The value of one parameter setting for tensor ``name`` at depth ``t`` (None: no filter matched)."""
    if isinstance(setting, ConditionalSetting):
        setting = [setting]
    if isinstance(setting, list):
        if setting and all(isinstance(s, ConditionalSetting) for s in setting):
            for cond in setting:
                if _matches(cond.filter, name, group):
                    return evaluate_setting(cond.value, name, t=t, group=group)
            return None
        return _interpolate(setting, t)  # type: ignore[arg-type]
    return setting


def resolve_settings(sources: list[Parameters | None], name: str, *, t: float, group: str | None,
                     keys: set[str] | None = None) -> dict[str, Any]:
    """Merge parameter dicts given from highest to lowest precedence into values for one tensor."""
    out: dict[str, Any] = {}
    for params in sources:
        for key, setting in (params or {}).items():
            if key in out or (keys is not None and key not in keys):
                continue
            value = evaluate_setting(setting, name, t=t, group=group)
            if value is not None:
                out[key] = value
    return out
