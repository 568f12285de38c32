"""The merge-method protocol, the :data:`METHODS` registry and shared tensor maths.

A merge method is pure maths over one tensor name: it receives a :class:`TensorInputs`
(the tensors of every input model, the base tensor when there is one, the per-model
weights, the resolved parameters, a seeded generator and optional per-model statistics)
and returns the merged tensor. File handling, sharding and dtype casting live in the
executor (:mod:`expertkit.merge.executor`); :func:`expertkit.merge.merge_state_dicts` is the
in-memory reference over whole state dicts.

Every method registers itself where it is defined with :func:`merge_method`, declaring a
pydantic parameter model (defaults and help text), whether it needs a base model, and which
parameters may differ per input model (``per_model``, e.g. ``density``).

Arithmetic is done in float32 (float64 when any input is float64); the executor casts the
result to the output dtype.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from expertkit.errors import ConfigError, IncompatibleModelsError
from expertkit.registry import Registry


class MethodParams(BaseModel):
    """Base of every method's parameter model: frozen, unknown keys refused, ``lambda`` alias allowed,
    NaN and infinities refused in every float parameter."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the function and its contract."""

    name: str
    fn: Callable[[TensorInputs], torch.Tensor]
    params: type[MethodParams]
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    per_model: frozenset[str] = frozenset()  # parameters that may take a value per input model
    stats: str | None = None  # "fisher" or "gram": per-model statistics the method needs
    zero_copy: bool = False  # only reads its inputs: the executor may hand it memory-mapped views
    # params -> "total" (divides by sum_i w_i), "subsets" (divides by the weights of the models that
    # agree at an element, as TIES' disjoint mean) or None (no division by weights); see check_weights
    normaliser: Callable[[Any], str | None] | None = None
    uses_weights: bool = True  # False: per-model ``weight`` plays no part (slerp's t, model stock's angle)
    optional_base: bool = False  # uses a base when the config gives one (slerp, nuslerp, multislerp)

    def __call__(self, x: TensorInputs) -> torch.Tensor:
        return self.fn(x)


METHODS: Registry[MergeMethod] = Registry("merge method")


def merge_method(
    name: str, *, params: type[MethodParams], paper: str, summary: str, needs_base: bool = False,
    min_models: int = 1, max_models: int | None = None, per_model: Sequence[str] = (), stats: str | None = None,
    zero_copy: bool = False, normaliser: Callable[[Any], str | None] | None = None, uses_weights: bool = True,
    optional_base: bool = False, vs_mergekit: str = "not in mergekit",
) -> Callable[[Callable[[TensorInputs], torch.Tensor]], Callable[[TensorInputs], torch.Tensor]]:
    """Decorator registering ``fn(TensorInputs) -> Tensor`` in :data:`METHODS` as ``name``.

    ``zero_copy``: the method gains nothing from owning (overwriting) its inputs, so the executor
    maps input tensors copy-on-write instead of reading them into fresh memory (no copy for
    tensors that are only read) and never hands them over as ``owned``.

    ``normaliser``: ``params -> "total" | "subsets" | None``, how the method divides by the weights
    (:func:`expertkit.merge.core.check_weights` refuses weights that nearly cancel there).
    ``vs_mergekit``: how the output compares with mergekit 0.1.5's (docs/merge.md's table; the
    comparison tests check it).
    """

    def deco(fn: Callable[[TensorInputs], torch.Tensor]) -> Callable[[TensorInputs], torch.Tensor]:
        method = MergeMethod(name, fn, params, needs_base, min_models, max_models, frozenset(per_model), stats,
                             zero_copy, normaliser, uses_weights, optional_base)
        METHODS.add(name, method, params=params, paper=paper, summary=summary, vs_mergekit=vs_mergekit)
        return fn

    return deco


@dataclass
class TensorInputs:
    """Everything a merge method sees for one tensor name.

    ``tensors[i]`` is model *i*'s tensor, ``base`` the base model's (or None), ``weights[i]`` the
    per-model weight, ``params`` the method's parameters resolved for this tensor, ``per_model[i]``
    the parameters resolved for model *i* (equal to ``params`` except for per-model overrides),
    ``generator`` a CPU generator seeded from the merge seed and the tensor name (so any order of
    tensors gives the same result), ``stats[i]`` model *i*'s statistic for this tensor (Fisher
    diagonal or input Gram matrix) or None.
    """

    name: str
    tensors: list[torch.Tensor]
    base: torch.Tensor | None
    weights: list[float]
    params: Any
    per_model: list[Any]
    generator: torch.Generator
    stats: list[torch.Tensor | None] | None = None
    owned: bool = False  # the caller hands over ``tensors``: a method may overwrite them (saves memory)
    extra: dict[str, Any] = field(default_factory=dict)
    out_dtype: torch.dtype | None = None  # the caller casts the result to this; a method may write it directly

    @property
    def work_dtype(self) -> torch.dtype:
        """float64 when any input is float64, else float32."""
        ts = [*self.tensors, *([self.base] if self.base is not None else [])]
        return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32

    def work(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as a fresh tensor in the working dtype (never aliases the input)."""
        return t.to(self.work_dtype, copy=True)

    def deltas(self) -> list[torch.Tensor]:
        """Task vectors ``tensors[i] - base`` in the working dtype (the base must be present).

        New tensors, or, when ``owned``, the input tensors themselves overwritten in place.
        """
        assert self.base is not None  # the executor checks needs_base before any work
        wd = self.work_dtype
        b = self.base.to(wd)
        return [t.sub_(b) if self.owned and t.dtype == wd else torch.sub(t.to(wd), b) for t in self.tensors]


def tensor_seed(seed: int, name: str) -> int:
    """A stable per-tensor seed: the merge seed mixed with the CRC-32 of the tensor name."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by :func:`tensor_seed`."""
    g = torch.Generator()
    g.manual_seed(tensor_seed(seed, name))
    return g


# ----------------------------------------------------------------------- shared maths
def top_k_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask keeping the ``k = max(1, int(density * numel))`` largest ``|t|`` of the whole tensor.

    The threshold is the k-th largest magnitude; elements tied with it are all kept (so a
    tensor with ties may keep slightly more than k). ``density >= 1`` keeps everything,
    ``density <= 0`` nothing.
    """
    if density >= 1:
        return torch.ones_like(t, dtype=torch.bool)
    if density <= 0 or t.numel() == 0:
        return torch.zeros_like(t, dtype=torch.bool)
    mag = t.abs()  # (*shape)
    return mag >= _kth_largest(mag, density)


def _kth_largest(mag: torch.Tensor, density: float) -> torch.Tensor:
    n = mag.numel()
    k = max(1, int(density * n))
    return torch.kthvalue(mag.reshape(-1), n - k + 1).values  # the k-th largest magnitude


def trim_(t: torch.Tensor, density: float) -> torch.Tensor:
    """Zero, in place, every element of ``t`` outside :func:`top_k_mask` (same rule); returns ``t``."""
    if density >= 1:
        return t
    if density <= 0 or t.numel() == 0:
        return t.zero_()
    mag = t.abs()  # (*shape)
    return t.masked_fill_(mag < _kth_largest(mag, density), 0)


def l1_rescale_(kept: torch.Tensor, l1_before: float) -> torch.Tensor:
    """Multiply ``kept`` in place so its L1 norm is ``l1_before`` (mergekit's ``rescale`` of a
    sparsified task vector); an all-zero ``kept`` stays 0. Returns ``kept``."""
    after = float(kept.abs().sum())
    return kept.mul_(l1_before / after) if after > 0 else kept


def bernoulli_keep(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Bool mask keeping each element independently with probability ``density`` (seeded)."""
    if density >= 1:
        return torch.ones_like(t, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(t, dtype=torch.bool)
    u = torch.rand(t.shape, generator=generator, dtype=torch.float32)  # (*shape) in [0, 1)
    return u < density


def elect_and_mean(deltas: list[torch.Tensor], weights: Sequence[float], normalize: bool,
                   votes: Sequence[float] | None = None) -> torch.Tensor:
    """TIES sign election and disjoint (weighted) mean of already-trimmed deltas.

    With ``s = sum_i v_i d_i`` (votes ``v`` default to the weights ``w``) the elected sign is ``+1`` where ``s >= 0`` else ``-1``. Model *i*
    takes part at an element when the sign of ``w_i d_i`` equals the elected sign (a zero delta
    never does; a negative weight flips the sign). The result is ``sum_i w_i d_i [agree_i]``,
    divided by ``sum_i w_i [agree_i]`` when ``normalize`` (a zero divisor counts as 1). Deltas are
    consumed (modified in place).
    """
    votes = weights if votes is None else votes
    # the summed mass: v_0 d_0 (as 0 + v_0 d_0, whose sign of 0 ge_(0) ignores), then + v_i d_i
    sign = torch.mul(deltas[0], votes[0]) if votes[0] != 1 else deltas[0].clone()
    for d, v in zip(deltas[1:], votes[1:], strict=True):
        sign.add_(d, alpha=v)
    sign.ge_(0).mul_(2).sub_(1)  # (*shape): the elected sign, +1 / -1, in place of the sum
    acc = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign) if normalize else None
    for d, w in zip(deltas, weights, strict=True):
        if w == 0:
            continue  # w_i d_i is 0: it never agrees
        # |w_i d_i| where w_i d_i has the elected sign, else 0: relu(sign(w_i) * elected * d_i)
        d.mul_(sign)
        if w < 0:
            d.neg_()
        d.clamp_(min=0)
        acc.add_(d, alpha=abs(w))
        if divisor is not None:
            # [d_i > 0] as 1.0 / 0.0 (d_i >= 0 here; where d_i is NaN so is acc): sign_() is one
            # vectorised op, where ``d > 0`` builds a bool tensor that add_ must promote (10x slower)
            divisor.add_(d.sign_(), alpha=w)
    if divisor is not None:
        used = [w for w in weights if w != 0]
        if used and min(used) > 0:
            # positive weights: a nonzero divisor is at least the smallest weight, and where it is 0
            # so is acc, so raising 0 to that weight divides 0 by it as the masked 1 would
            acc.div_(divisor.clamp_(min=min(used)))
        else:
            acc.div_(divisor.masked_fill_(divisor == 0, 1))
    return acc.mul_(sign)  # sum_i w_i d_i [agree_i] (/ divisor), the same numbers as summing signed terms


def weighted_sum(ts: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool,
                 dtype: torch.dtype | None = None, *, inplace: bool = False,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i w_i t_i`` in ``dtype`` (default the first tensor's), divided by ``sum_i w_i`` when
    ``normalize`` (callers refuse weights that cancel first: :func:`expertkit.merge.core.check_weights`;
    a zero sum divides by zero, as in mergekit). A new tensor, unless ``inplace`` (then the
    first tensor, when of ``dtype``, is overwritten and returned) or ``out`` is given (a tensor of
    ``dtype`` and the inputs' shape, none of them: written and returned); inputs are only read.

    Element by element the operations are always ``w_0 t_0`` (skipped when ``w_0 = 1``), then
    ``+ w_i t_i`` in order, then ``/ sum_i w_i`` (mergekit's order, so a linear merge with unit
    weights is bit-identical to mergekit's)."""
    dtype = dtype or ts[0].dtype
    s = float(sum(weights))
    divisor = s if normalize else None
    first = ts[0]
    if inplace and first.dtype == dtype:
        _weighted_into(first, [first, *(t.to(dtype) for t in ts[1:])], weights, True, divisor)
        return first
    out = torch.empty(first.shape, dtype=dtype) if out is None else out
    _weighted_into(out, [t.to(dtype) for t in ts], weights, False, divisor)
    return out


def _weighted_into(out: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], out_is_first: bool,
                    divisor: float | None) -> None:
    """``out = (sum_i w_i x_i) / divisor``, written in place; ``out`` may be ``xs[0]`` (``out_is_first``)."""
    w0, k = weights[0], 1
    if out_is_first:
        if w0 != 1:  # multiplying by 1 is exact: skip the pass
            out.mul_(w0)
    elif w0 == 1 and len(xs) > 1:  # fused: the first add writes the result
        torch.add(xs[0], xs[1], alpha=weights[1], out=out)
        k = 2
    else:
        torch.mul(xs[0], w0, out=out)
    for x, w in zip(xs[k:], weights[k:], strict=True):
        out.add_(x, alpha=w)
    if divisor is not None:
        out.div_(divisor)


def if_normalize(kind: str) -> Callable[[Any], str | None]:
    """A ``normaliser`` for :func:`merge_method`: ``kind`` when the method's ``normalize`` is on."""
    return lambda p: kind if p.normalize else None


def check_method_inputs(method: MergeMethod, n_models: int, has_base: bool) -> None:
    """Raise when the number of models or the base does not fit the method's contract."""
    if method.needs_base and not has_base:
        raise ConfigError(
            f"merge method '{method.name}' needs a base model (it merges task vectors, model - base); "
            "give base_model in the config (or base= in Python)."
        )
    if n_models < method.min_models:
        raise ConfigError(f"merge method '{method.name}' needs at least {method.min_models} input model(s), "
                          f"got {n_models}.")
    if method.max_models is not None and n_models > method.max_models:
        raise ConfigError(f"merge method '{method.name}' takes at most {method.max_models} input model(s) "
                          f"(besides the base), got {n_models}.")


def shapes_equal(name: str, ts: Sequence[torch.Tensor]) -> None:
    """Raise :class:`IncompatibleModelsError` when the tensors of ``name`` differ in shape."""
    shapes = {tuple(t.shape) for t in ts}
    if len(shapes) > 1:
        raise IncompatibleModelsError(
            f"tensor '{name}' has different shapes across the models: {sorted(shapes)}; "
            "the models have different architectures or sizes.")
