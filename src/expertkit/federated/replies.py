"""Shape checks of client replies before a Flower strategy sees them.

A verified signature says who sent a reply, not that the reply is well formed, and Flower's
strategies trust the shape of what they aggregate: ``validate_message_reply_consistency`` raises
for the whole round when one reply differs from the others (so one odd reply would cost every
honest update of the round), a weight of 0 divides by zero, and an ``Array`` is decoded from its
``.npy`` bytes whatever its declared shape says (a ``(1,)`` array broadcasts silently into a
``(3,)`` sum). So every reply is checked on its own:

* :func:`check_reply`: exactly one metric record whose weight is a finite number > 0 and whose
  values are numbers or lists of numbers; for a training reply exactly one array record whose
  tensors are well-formed ``.npy`` buffers (header read with ``numpy.lib.format``, no decoding)
  that agree with their declared dtype and shape;
* :func:`array_layout`, :func:`metric_layout` and :func:`pick_layout`: the replies of a round
  must agree with the arrays the server sent (names and shapes) and with each other (dtypes,
  metric names, list lengths); the layout most replies share wins and the others are dropped
  with the difference named.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: record name -> ((tensor name, dtype, shape), ...) sorted by tensor name
ArrayLayout = tuple[tuple[str, tuple[tuple[str, str, tuple[int, ...]], ...]], ...]
#: (record name, ((metric name, list length or -1 for a number), ...))
MetricLayout = tuple[str, tuple[tuple[str, int], ...]]
NUMPY_STYPE = "numpy.ndarray"


def _records(content: Any, kind: type) -> list[tuple[str, Any]]:
    return [(name, rec) for name, rec in content.items() if isinstance(rec, kind)]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, payload offset)`` of ``.npy`` bytes; ``ValueError`` when malformed."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    return tuple(shape), dtype, f.tell()


def check_array(name: str, arr: Any) -> str | None:
    """Why tensor ``name`` cannot be decoded as declared, or ``None`` when it can."""
    stype, dtype, shape, data = (getattr(arr, f, None) for f in ("stype", "dtype", "shape", "data"))
    if stype != NUMPY_STYPE:
        return f"tensor '{name[:80]}': serialization {str(stype)[:40]!r} (expected '{NUMPY_STYPE}')"
    if not isinstance(data, bytes) or not isinstance(dtype, str) or not isinstance(shape, tuple):
        return f"tensor '{name[:80]}': malformed fields"
    try:
        npy_shape, npy_dtype, offset = _npy_header(data)
        declared = np.dtype(dtype)
    except (ValueError, TypeError, SyntaxError) as exc:
        return f"tensor '{name[:80]}': not a readable .npy buffer ({str(exc)[:120]})"
    if npy_dtype.hasobject or npy_dtype.kind not in "biufc":
        return f"tensor '{name[:80]}': dtype {npy_dtype} is not numeric"
    if npy_dtype != declared or npy_shape != tuple(shape):
        return (f"tensor '{name[:80]}': the bytes hold {npy_dtype} {npy_shape}, the record declares "
                f"{dtype[:40]} {tuple(shape)[:8]}")
    if len(data) - offset != math.prod(npy_shape) * npy_dtype.itemsize:
        return f"tensor '{name[:80]}': {len(data) - offset} bytes of data for shape {npy_shape} ({npy_dtype})"
    return None


def check_reply(content: Any, weight_key: str, *, train: bool) -> str | None:
    """Why a (verified) reply cannot be aggregated on its own, or ``None`` when it can."""
    from flwr.app import ArrayRecord, MetricRecord

    metrics = _records(content, MetricRecord)
    if len(metrics) != 1:
        return f"{len(metrics)} metric records (exactly one expected)"
    rec = metrics[0][1]
    weight = rec.get(weight_key)
    if not _number(weight) or not math.isfinite(weight) or weight <= 0:
        return f"weight '{weight_key}' is {weight!r:.40} (a finite number > 0 expected)"
    for key, value in rec.items():
        values = value if isinstance(value, list) else [value]
        if not all(_number(v) for v in values):
            return f"metric '{str(key)[:80]}' is not a number or a list of numbers"
    if train:
        arrays = _records(content, ArrayRecord)
        if len(arrays) != 1:
            return f"{len(arrays)} array records (exactly one expected)"
        for key, arr in arrays[0][1].items():
            why = check_array(str(key), arr)
            if why:
                return why
    return None


def array_layout(content: Any) -> ArrayLayout:
    """Names, dtypes and shapes of every array record of ``content`` (a checked reply or a server message)."""
    from flwr.app import ArrayRecord

    return tuple((name, tuple(sorted((k, a.dtype, tuple(int(d) for d in a.shape)) for k, a in rec.items())))
                 for name, rec in _records(content, ArrayRecord))


def metric_layout(content: Any) -> MetricLayout:
    """The metric record's name, and its metric names with list lengths (-1 for a number)."""
    from flwr.app import MetricRecord

    name, rec = _records(content, MetricRecord)[0]
    return name, tuple(sorted((k, len(v) if isinstance(v, list) else -1) for k, v in rec.items()))


def without_dtypes(layout: ArrayLayout) -> ArrayLayout:
    """The layout with every dtype blanked: what a reply must share with the server's message
    (a strategy may send float64, e.g. FedAdam, and clients answer in their own dtype)."""
    return tuple((name, tuple((k, "", shape) for k, _, shape in tensors)) for name, tensors in layout)


def layout_difference(got: ArrayLayout, want: ArrayLayout) -> str:
    """One line naming the first difference between two array layouts."""
    if [n for n, _ in got] != [n for n, _ in want]:
        return f"array records {[n for n, _ in got][:4]} (expected {[n for n, _ in want][:4]})"
    for (_, g), (_, w) in zip(got, want, strict=True):
        g_map, w_map = {t[0]: t[1:] for t in g}, {t[0]: t[1:] for t in w}
        missing, extra = sorted(set(w_map) - set(g_map)), sorted(set(g_map) - set(w_map))
        if missing or extra:
            return f"tensors missing {missing[:3]}, unexpected {extra[:3]}"
        for k in w_map:
            if g_map[k] != w_map[k]:
                return f"tensor '{k[:80]}' is {_spec(*g_map[k])}, expected {_spec(*w_map[k])}"
    return "same arrays"


def _spec(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype} {shape[:8]}" if dtype else f"of shape {shape[:8]}"


def pick_layout(layouts: list[T]) -> T | None:
    """The metric layout most replies share (the first seen of the most common on a tie)."""
    return Counter(layouts).most_common(1)[0][0] if layouts else None
