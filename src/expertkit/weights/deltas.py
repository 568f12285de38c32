"""Task vectors: the difference between a fine-tuned model and its base.

:func:`task_vector` streams ``finetuned - base`` one tensor at a time, so peak
memory is two tensors, not two models. Before the first tensor is produced it
checks that the two models are compatible: the same tensor names (or, with
``names=``, that every requested name is in both) and the same shapes.

Integer and bool tensors (position ids, quantisation indices, masks) have no
meaningful difference. They are **not** part of the task vector, and they must
be **equal** in both models: they are read and compared during the up-front
check, and any that differ raise :class:`IncompatibleModelsError` before
anything is yielded.

:func:`apply_delta` is the pure inverse: ``base + scale * delta``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from expertkit.errors import IncompatibleModelsError, InputTypeError, unknown
from expertkit.weights.reader import Checkpoint

ModelSource = Checkpoint | Mapping[str, torch.Tensor] | str | os.PathLike[str]

_SHOW = 5  # offenders listed in an error message


class TensorSource:
    """A uniform read-only view of a :class:`Checkpoint` or an in-memory state dict."""

    def __init__(self, source: ModelSource) -> None:
        self._owned = False
        self._dict: Mapping[str, torch.Tensor] | None = None
        self._ckpt: Checkpoint | None = None
        if isinstance(source, Checkpoint):
            self._ckpt = source
        elif isinstance(source, Mapping):
            self._dict = source
        elif isinstance(source, (str, os.PathLike)):
            self._ckpt = Checkpoint(Path(source))
            self._owned = True
        else:
            raise InputTypeError(
                f"expected a Checkpoint, a path or a state dict, not {type(source).__name__}."
            )
        self.label = str(self._ckpt.path) if self._ckpt is not None else "<state dict>"

    @property
    def underlying(self) -> Checkpoint | Mapping[str, torch.Tensor]:
        """The wrapped Checkpoint or state dict."""
        return self._ckpt if self._ckpt is not None else self._dict  # type: ignore[return-value]

    def names(self) -> list[str]:
        """Tensor names (file order for checkpoints, insertion order for dicts)."""
        return self._ckpt.names() if self._ckpt is not None else list(self._dict)  # type: ignore[arg-type]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, without reading it."""
        if self._ckpt is not None:
            return self._ckpt.info(name).shape
        return tuple(self._dict[name].shape)  # type: ignore[index]

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of one tensor, without reading it."""
        if self._ckpt is not None:
            return self._ckpt.info(name).dtype
        return self._dict[name].dtype  # type: ignore[index]

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        if self._ckpt is not None:
            return self._ckpt.read(name)
        return self._dict[name].detach()  # type: ignore[index]

    def close(self) -> None:
        """Close the checkpoint if this view opened it."""
        if self._owned and self._ckpt is not None:
            self._ckpt.close()


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def check_compatible(
    finetuned: TensorSource, base: TensorSource, names: list[str] | None = None
) -> list[str]:
    """Check that two models can be subtracted; return the names to stream.

    Raises :class:`IncompatibleModelsError` listing a few offenders when names
    or shapes differ, or when an integer/bool tensor differs in value.
    """
    ft_names, base_names = finetuned.names(), base.names()
    ft_set, base_set = set(ft_names), set(base_names)
    if names is None:
        only_ft = [n for n in ft_names if n not in base_set]
        only_base = [n for n in base_names if n not in ft_set]
        if only_ft or only_base:
            parts = []
            if only_ft:
                parts.append(f"{len(only_ft)} only in the fine-tuned model: {_listing(only_ft)}")
            if only_base:
                parts.append(f"{len(only_base)} only in the base: {_listing(only_base)}")
            raise IncompatibleModelsError(
                f"the models have different tensors ({'; '.join(parts)}). Check that the fine-tuned "
                "model was made from this base (same architecture and saving code), or pass names= "
                "to restrict the task vector to tensors both share."
            )
        names = ft_names
    else:
        for n in names:
            if n not in ft_set:
                raise unknown("tensor", n, ft_names)
            if n not in base_set:
                raise unknown("tensor", n, base_names)
    bad_shapes = [
        f"{n} {list(finetuned.shape(n))} vs {list(base.shape(n))}"
        for n in names
        if finetuned.shape(n) != base.shape(n)
    ]
    if bad_shapes:
        raise IncompatibleModelsError(
            f"{len(bad_shapes)} tensors differ in shape (fine-tuned vs base): {_listing(bad_shapes)}. "
            "The models have different architectures or sizes (e.g. a resized vocabulary); "
            "use the base the model was fine-tuned from, or exclude these tensors with names=."
        )
    bad_values = []
    for n in names:
        if not (finetuned.dtype(n).is_floating_point and base.dtype(n).is_floating_point):
            if not torch.equal(finetuned.read(n), base.read(n).to(finetuned.dtype(n))):
                bad_values.append(n)
    if bad_values:
        raise IncompatibleModelsError(
            f"{len(bad_values)} integer/bool tensors differ between the models: {_listing(bad_values)}. "
            "A task vector covers floating-point weights only and needs the others to be equal; "
            "exclude these tensors with names= if they may differ."
        )
    return names


def task_vector(
    finetuned: ModelSource,
    base: ModelSource,
    *,
    names: list[str] | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the task vector ``finetuned - base`` as ``(name, delta)`` pairs.

    Args:
        finetuned: the fine-tuned model (Checkpoint, path or state dict).
        base: the base model it was fine-tuned from.
        names: restrict to these tensor names (each must be in both models);
            by default the two models must hold exactly the same names.
        dtype: dtype of the deltas; by default the promotion of the fine-tuned
            dtype with float32 (so bf16/fp16 weights give float32 deltas,
            float64 stays float64).

    The compatibility check runs now, before this function returns; the
    deltas are computed lazily, one tensor at a time, in the fine-tuned
    model's order. Integer/bool tensors are skipped (and checked equal).
    Checkpoints opened here from paths are closed when the stream ends.
    """
    ft, bs = TensorSource(finetuned), TensorSource(base)
    try:
        chosen = check_compatible(ft, bs, names)
    except BaseException:
        ft.close()
        bs.close()
        raise
    return _stream(ft, bs, chosen, dtype)


def _stream(
    ft: TensorSource, bs: TensorSource, names: list[str], dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        for n in names:
            if not (ft.dtype(n).is_floating_point and bs.dtype(n).is_floating_point):
                continue
            out = dtype or torch.promote_types(ft.dtype(n), torch.float32)
            # (*shape) - (*shape) -> (*shape)
            yield n, ft.read(n).to(out) - bs.read(n).to(out)
    finally:
        ft.close()
        bs.close()


def apply_delta(base_tensor: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Return ``base_tensor + scale * delta`` as a new tensor of ``base_tensor``'s dtype.

    The sum is computed in at least float32 (so bf16 weights do not lose the
    delta to rounding twice) and cast back. Shapes must match exactly;
    ``base_tensor`` must be floating point.
    """
    if tuple(base_tensor.shape) != tuple(delta.shape):
        raise IncompatibleModelsError(
            f"delta shape {list(delta.shape)} does not match the base tensor's {list(base_tensor.shape)}. "
            "The delta was made for a different model; check the base."
        )
    if not base_tensor.dtype.is_floating_point:
        raise InputTypeError(
            f"cannot add a delta to a {base_tensor.dtype} tensor; deltas apply to floating-point weights only."
        )
    work = torch.promote_types(torch.promote_types(base_tensor.dtype, delta.dtype), torch.float32)
    # (*shape) + scalar * (*shape) -> (*shape)
    out = base_tensor.to(work) + scale * delta.to(work)
    return out.to(base_tensor.dtype)
