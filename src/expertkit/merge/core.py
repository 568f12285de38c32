"""The in-memory reference merge (:func:`merge_state_dicts`) and the per-tensor step it shares
with the streaming executor (:func:`merge_tensor`).

The executor and the reference call the same :func:`merge_tensor` with the same seeded
generator per tensor name, so a streamed merge equals the in-memory merge bit for bit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from pydantic import ValidationError

from expertkit.config import config_error, error_lines
from expertkit.errors import ConfigError, IncompatibleModelsError, InputTypeError
from expertkit.merge.methods import METHODS, MergeMethod, MethodParams, TensorInputs
from expertkit.merge.methods.base import check_method_inputs, generator_for, shapes_equal


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; unknown names raise with the nearest suggestion."""
    return METHODS.get(name)


def resolve_params(method: MergeMethod, params: Mapping[str, Any] | None, *, where: str = "parameters") -> MethodParams:
    """Validate ``params`` against the method's parameter model (every problem in one ConfigError)."""
    try:
        return method.params.model_validate(dict(params or {}))
    except ValidationError as exc:
        raise config_error(f"{where} of merge method '{method.name}'", error_lines(exc, method.params)) from None


#: A normalising method refuses weights whose sum is below this fraction of their absolute sum:
#: dividing by it would multiply the merge by more than 1000 (weights that nearly cancel).
NORMALISER_MIN = 1e-3
#: Up to this many weights of mixed signs every subset is checked (TIES-style disjoint means divide
#: by the weights of the models that agree at an element, any subset); beyond it, the total only.
MAX_SUBSET_CHECK = 16


def as_weights(values: Sequence[Any], *, where: str) -> list[float]:
    """The weights as floats; a string, bool or other non-number is a :class:`ConfigError`."""
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (str, bool, bytes)) or v is None:
            raise ConfigError(f"{where}: the weight of model {i + 1} is {v!r}; weights must be numbers.")
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: the weight of model {i + 1} is {v!r}; weights must be numbers.") from None
    return out


def check_weights(method: MergeMethod, weights: Sequence[float], params: MethodParams, *, where: str) -> None:
    """Refuse non-finite weights, and weights that (nearly) cancel where the method divides by them.

    With ``normaliser`` ``"total"`` the divisor is ``sum_i w_i``; with ``"subsets"`` it is, at each
    element, the sum of the agreeing models' weights (any subset of the non-zero weights). A
    divisor below :data:`NORMALISER_MIN` times the same weights' absolute sum is refused with the
    numbers (mergekit returns NaN/inf for a zero sum and a blown-up model for a near-zero one).
    """
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise ConfigError(f"{where}: the weight of model {i + 1} is {w!r}; weights must be finite numbers.")
    kind = method.normaliser(params) if method.normaliser is not None else None
    if kind is not None:
        problem = _cancelling(kind, tuple(float(w) for w in weights))
        if problem:
            raise ConfigError(f"{where}: {problem} Give weights that do not cancel, or set normalize: false.")


@lru_cache(maxsize=256)
def _cancelling(kind: str, weights: tuple[float, ...]) -> str | None:
    """A description of the worst near-zero divisor the weights allow, or None."""
    if kind == "total":
        groups: Any = [tuple(range(len(weights)))]
    else:
        nonzero = [i for i, w in enumerate(weights) if w != 0]
        if len({w > 0 for w in (weights[i] for i in nonzero)}) < 2:
            return None  # one sign: no subset cancels (zero weights never take part)
        if len(nonzero) > MAX_SUBSET_CHECK:
            groups = [tuple(nonzero)]
        else:
            groups = (g for r in range(2, len(nonzero) + 1) for g in itertools.combinations(nonzero, r))
    worst = None
    for g in groups:
        total = sum(weights[i] for i in g)
        mass = sum(abs(weights[i]) for i in g)
        if mass == 0 or abs(total) < NORMALISER_MIN * mass:
            ratio = math.inf if total == 0 else mass / abs(total)
            if worst is None or ratio > worst[0]:
                worst = (ratio, g, total, mass)
    if worst is None:
        return None
    ratio, g, total, mass = worst
    ws = ", ".join(f"{weights[i]:.9g}" for i in g)
    which = "the weights" if kind == "total" else f"the weights of models {', '.join(str(i + 1) for i in g)}"
    effect = ("the division is by zero" if total == 0 else
              f"dividing by it would multiply the merge by {ratio:.3g}")
    where = "" if kind == "total" else " (the disjoint mean divides by the weights of the models that agree at an element)"
    return f"{which} [{ws}] sum to {total:.3g} against an absolute sum of {mass:.3g}{where}; {effect}."


def merge_tensor(
    method: MergeMethod, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *,
    weights: Sequence[float], params: MethodParams, per_model: Sequence[MethodParams] | None = None,
    seed: int = 0, stats: Sequence[torch.Tensor | None] | None = None, out_dtype: torch.dtype | None = None,
    owned: bool = False,
) -> torch.Tensor:
    """Merge one tensor name. Non-floating tensors must be equal in every input and are copied.

    The result has ``out_dtype`` (default: the base's dtype, else the first model's). With
    ``owned`` the method may overwrite ``tensors`` (the executor passes freshly read tensors);
    the result is the same.
    """
    everything = [*tensors, *([base] if base is not None else [])]
    shapes_equal(name, everything)
    dtype = out_dtype or (base.dtype if base is not None else tensors[0].dtype)
    if not all(t.dtype.is_floating_point for t in everything):
        first = everything[0]
        if any(not torch.equal(t, first) for t in everything[1:]):
            raise IncompatibleModelsError(
                f"integer/bool tensor '{name}' differs between the models; such tensors cannot be merged "
                "and must be equal. Check that the models share an architecture and a tokenizer.")
        return first.clone()
    x = TensorInputs(name, list(tensors), base, list(weights), params,
                     list(per_model) if per_model is not None else [params] * len(tensors),
                     generator_for(seed, name), list(stats) if stats is not None else None,
                     owned and len({id(t) for t in everything}) == len(everything), out_dtype=dtype)
    return method(x).to(dtype)


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    stats: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge whole state dicts in memory: the reference the streaming executor is tested against.

    Args:
        method: a name registered in :data:`~expertkit.merge.METHODS` (``expertkit merge methods``).
        models: the input state dicts; every one must hold the same tensor names and shapes.
        base: the base state dict, needed by task-vector methods (``METHODS.get(name).needs_base``:
            task_arithmetic, ties, dare_*, della*, breadcrumbs*, sce, ram*, model_stock, nearswap,
            arcee_fusion); optional for slerp (first endpoint), nuslerp and multislerp (task
            vectors); ignored by linear, karcher, fisher and regmean.
        weights: one weight per model (default 1 each).
        params: the method's parameters (e.g. ``density``, ``lambda``, ``t``); unknown keys are errors.
        seed: seed of random methods (DARE); each tensor's generator is seeded from it and its name.
        stats: per-model statistics for ``fisher`` (diagonal Fisher, same names as the weights) or
            ``regmean`` (input Gram matrices keyed by weight name); see :mod:`expertkit.merge.stats`.

    Returns a new dict, in the first model's order, with each tensor in the base's dtype (else the
    first model's). Raises :class:`ConfigError` for a bad method/parameters or a missing base and
    :class:`IncompatibleModelsError` when names or shapes differ.
    """
    m = get_method(method)
    models = list(models)
    if not models:
        raise ConfigError("merge_state_dicts needs at least one model.")
    for i, sd in enumerate([*models, *([base] if base is not None else [])]):
        if not isinstance(sd, Mapping):
            raise InputTypeError(f"model {i} is a {type(sd).__name__}, not a mapping of tensor names to tensors.")
    check_method_inputs(m, len(models), base is not None)
    if weights is None:
        weights = [1.0] * len(models)
    if len(weights) != len(models):
        raise ConfigError(f"got {len(weights)} weights for {len(models)} models; give one weight per model.")
    if stats is not None and len(stats) != len(models):
        raise ConfigError(f"got {len(stats)} statistics for {len(models)} models; give one per model.")
    p = resolve_params(m, params)
    weights = as_weights(weights, where=f"merge method '{m.name}'")
    check_weights(m, weights, p, where=f"merge method '{m.name}'")
    names = list(models[0])
    _check_names(names, models, base)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        b = base[name] if base is not None else None
        st = [s.get(name) for s in stats] if stats is not None else None
        out[name] = merge_tensor(m, name, [sd[name] for sd in models], b, weights=weights, params=p,
                                 seed=seed, stats=st)
    return out


def _check_names(names: list[str], models: Sequence[Mapping[str, torch.Tensor]],
                 base: Mapping[str, torch.Tensor] | None) -> None:
    want = set(names)
    problems = []
    for label, sd in [*((f"model {i}", sd) for i, sd in enumerate(models)), *([("base", base)] if base else [])]:
        have = set(sd)
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            problems.append(f"{label}: {len(missing)} missing ({', '.join(missing[:3])}) and "
                            f"{len(extra)} extra ({', '.join(extra[:3])}) tensors vs model 0")
    if problems:
        raise IncompatibleModelsError("the state dicts hold different tensors: " + "; ".join(problems) +
                                      ". Merge models of one architecture and size.")
