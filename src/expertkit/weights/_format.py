"""The safetensors file format, read and written by hand.

Format: 8 bytes little-endian header length N, then N bytes of JSON
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}``,
offsets relative to the end of the header), then the raw tensor bytes.

expertkit reads and writes it with plain file I/O instead of ``safe_open``'s
memory map, so that reading a tensor costs exactly that tensor's bytes of
resident memory, and no mapped pages pile up over a whole checkpoint.

A header crosses a trust boundary, so :func:`parse_header` validates all of it
once, before any tensor is read, with the rules of the safetensors library
itself (0.8.0; checked against it by hand-built files in
``tests/weights/test_corrupt_headers.py``): header length at most 100,000,000
bytes and inside the file; UTF-8 JSON object; ``__metadata__`` absent, null or
a mapping of strings to strings; each tensor a known dtype, a shape of
non-negative integers, two non-negative integer offsets; the byte length
``end - begin`` equal to the element count times the dtype's size in bits / 8
(a whole number of bytes); and the tensors, sorted by ``(begin, end)``, tiling
the data section exactly: the first begins at 0, each begins where the
previous ends (no gap, no overlap; empty tensors may share an offset), and the
last ends at the end of the file (no trailing bytes). Unknown keys inside a
tensor entry are ignored, as the library ignores them. Stricter than the
library in one point: a tensor name given twice in the JSON object is refused
(the library keeps the last).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from expertkit.errors import CheckpointError

#: safetensors dtype name -> (torch dtype or None when torch has none, size in bits).
#: The names are every variant of the safetensors 0.8 ``Dtype`` enum.
_TABLE: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 64),
    "F32": (torch.float32, 32),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "C64": (torch.complex64, 64),
    "I64": (torch.int64, 64),
    "I32": (torch.int32, 32),
    "I16": (torch.int16, 16),
    "I8": (torch.int8, 8),
    "U64": (torch.uint64, 64),
    "U32": (torch.uint32, 32),
    "U16": (torch.uint16, 16),
    "U8": (torch.uint8, 8),
    "BOOL": (torch.bool, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 8),
    "F8_E5M2": (torch.float8_e5m2, 8),
    "F8_E4M3FNUZ": (torch.float8_e4m3fnuz, 8),
    "F8_E5M2FNUZ": (torch.float8_e5m2fnuz, 8),
    "F8_E8M0": (torch.float8_e8m0fnu, 8),
    # 4-bit floats: torch packs two per byte (float4_e2m1fn_x2), so a header shape (..., 2k)
    # is the torch shape (..., k), as safetensors.torch converts it.
    "F4": (torch.float4_e2m1fn_x2, 4),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
}
DTYPES: dict[str, torch.dtype] = {k: d for k, (d, _) in _TABLE.items() if d is not None}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_PACKED = {torch.float4_e2m1fn_x2: 2}  # torch dtype -> values per torch element

MAX_HEADER = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE)


@dataclass(frozen=True)
class HeaderEntry:
    """One validated tensor entry: torch dtype and shape, and offsets relative to the data start."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def _uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _entry(path: str, name: str, raw: object) -> tuple[str, list[int], int, int]:
    """Check one tensor entry's types; returns (dtype name, shape, begin, end)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor '{name}': {what}; the file is corrupt.")

    if not isinstance(raw, dict):
        raise bad(f"its entry is a {type(raw).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in raw]
    if missing:
        raise bad(f"its entry lacks {', '.join(missing)}")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _TABLE:
        raise bad(f"unknown dtype {dtype!r} (safetensors knows {', '.join(_TABLE)})")
    if not isinstance(shape, list) or not all(_uint(s) for s in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(o) for o in offsets):
        raise bad(f"data_offsets {offsets!r} is not two non-negative integers")
    return dtype, shape, offsets[0], offsets[1]


def _torch_entry(path: str, name: str, dtype: str, shape: list[int], begin: int, end: int) -> HeaderEntry:
    """Check sizes and map a header entry to its torch dtype and shape."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor '{name}': {what}; the file is corrupt.")

    torch_dtype, bits = _TABLE[dtype]
    if begin > end:
        raise bad(f"data_offsets [{begin}, {end}] end before they begin")
    nbits = math.prod(shape) * bits
    if nbits % 8:
        raise bad(f"{dtype} shape {shape} is {nbits} bits, not a whole number of bytes")
    if end - begin != nbits // 8:
        raise bad(f"data_offsets [{begin}, {end}] hold {end - begin} bytes but {dtype} shape {shape} "
                  f"needs {nbits // 8}")
    if torch_dtype is None:
        raise CheckpointError(f"{path}: tensor '{name}' is {dtype}, which torch cannot hold; "
                              "convert it to another dtype first.")
    per = _PACKED.get(torch_dtype, 1)
    if per > 1:
        if not shape or shape[-1] % per:
            raise CheckpointError(f"{path}: tensor '{name}' is {dtype} with shape {shape}; torch holds "
                                  f"{per} values per element, so the last dimension must divide by {per}.")
        shape = [*shape[:-1], shape[-1] // per]
    return HeaderEntry(name, torch_dtype, tuple(shape), begin, end)


def parse_header(fh: Any, path: str, file_size: int) -> tuple[int, dict[str, str], list[HeaderEntry]]:
    """Read and validate the whole safetensors header of an open binary file.

    Returns ``(data_start, metadata, entries)``: the file offset at which tensor data begins,
    the ``__metadata__`` mapping (empty when absent) and the tensor entries in header order.
    Raises :class:`CheckpointError` naming the file and the tensor on any defect (see the module
    docstring for the rules).
    """
    fh.seek(0)
    raw = fh.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes).")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER:
        raise CheckpointError(f"{path}: not a safetensors file (header length {n} is over the "
                              f"safetensors limit of {MAX_HEADER} bytes).")
    if 8 + n > file_size:
        raise CheckpointError(f"{path}: header length {n} runs past the end of the {file_size}-byte "
                              "file; the file is truncated or not a safetensors file.")
    blob = fh.read(n)
    if len(blob) != n:
        raise CheckpointError(f"{path}: truncated safetensors header; the file is incomplete.")
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as dup:
        raise CheckpointError(f"{path}: the name '{dup.args[0]}' appears twice in one object of the "
                              "header; the file is corrupt.") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({str(exc)[:200]}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ is not a mapping of strings to strings; "
                              "the file is corrupt.")
    entries = [_torch_entry(path, name, *_entry(path, name, raw)) for name, raw in header.items()]
    # The tensors must tile the data section exactly, as the safetensors library requires.
    pos, data_size = 0, file_size - 8 - n
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            what = "overlaps the tensor before it" if e.begin < pos else f"leaves a gap at byte {pos}"
            raise CheckpointError(f"{path}: tensor '{e.name}' at data_offsets [{e.begin}, {e.end}] {what}; "
                                  "the file is corrupt.")
        pos = e.end
    if pos != data_size:
        last = max(entries, key=lambda e: (e.end, e.begin)).name if entries else None
        if pos > data_size:
            raise CheckpointError(f"{path}: tensor '{last}' ends at data byte {pos} but the file holds "
                                  f"{data_size} data bytes; the file is truncated.")
        after = f"the last tensor ('{last}')" if last else "the header (no tensors)"
        raise CheckpointError(f"{path}: {data_size - pos} bytes after {after} belong to no tensor; "
                              "the file is corrupt.")
    return 8 + n, metadata, entries


def header_shape(dtype: torch.dtype, shape: list[int]) -> list[int]:
    """The shape a safetensors header records for a torch tensor (packed dtypes count values)."""
    per = _PACKED.get(dtype, 1)
    if per == 1:
        return shape
    if not shape:
        raise CheckpointError(f"a 0-d {dtype} tensor cannot be stored in safetensors; give it a dimension.")
    return [*shape[:-1], shape[-1] * per]


def encode_header(entries: dict[str, dict[str, Any]], metadata: dict[str, str] | None) -> bytes:
    """Encode a header (length prefix + JSON padded with spaces to a multiple of 8)."""
    body: dict[str, Any] = {}
    if metadata:
        body["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    body.update(entries)
    blob = json.dumps(body, separators=(",", ":")).encode("utf-8")
    blob += b" " * ((-(8 + len(blob))) % 8)
    return struct.pack("<Q", len(blob)) + blob


def dtype_name(dtype: torch.dtype) -> str:
    """Map a torch dtype to its safetensors dtype string."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors.") from None
