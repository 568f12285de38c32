"""The safetensors file format, read and written by hand.

Format: 8 bytes little-endian header length N, then N bytes of JSON
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}``,
offsets relative to the end of the header), then the raw tensor bytes.

expertkit reads and writes it with plain file I/O instead of ``safe_open``'s
memory map, so that reading a tensor costs exactly that tensor's bytes of
resident memory, and no mapped pages pile up over a whole checkpoint.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

from expertkit.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def read_header(fh: Any, path: str) -> tuple[int, dict[str, Any]]:
    """Read a safetensors header from an open binary file.

    Returns ``(data_start, header)`` where ``data_start`` is the file offset at
    which tensor data begins. Raises :class:`CheckpointError` on a corrupt file.
    """
    fh.seek(0)
    raw = fh.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes).")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER:
        raise CheckpointError(f"{path}: not a safetensors file (header length {n} is implausible).")
    blob = fh.read(n)
    if len(blob) != n:
        raise CheckpointError(f"{path}: truncated safetensors header; the file is incomplete.")
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc}).") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object).")
    return 8 + n, header


def encode_header(entries: dict[str, dict[str, Any]], metadata: dict[str, str] | None) -> bytes:
    """Encode a header (length prefix + JSON padded with spaces to a multiple of 8)."""
    body: dict[str, Any] = {}
    if metadata:
        body["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    body.update(entries)
    blob = json.dumps(body, separators=(",", ":")).encode("utf-8")
    blob += b" " * ((-(8 + len(blob))) % 8)
    return struct.pack("<Q", len(blob)) + blob


def dtype_from_name(name: str, path: str = "") -> torch.dtype:
    """Map a safetensors dtype string to a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"{path}: unsupported safetensors dtype '{name}'.") from None


def dtype_name(dtype: torch.dtype) -> str:
    """Map a torch dtype to its safetensors dtype string."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors.") from None
