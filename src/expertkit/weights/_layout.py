"""How a :class:`~expertkit.weights.writer.ShardedWriter` lays tensors out: shard sizes, shard
file names (as transformers names them) and the order of tensors inside a shard."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from expertkit.errors import CheckpointError, ConfigError
from expertkit.weights._format import dtype_name, encode_header, header_shape

SINGLE_SHARD = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Parse a byte count: an int, or a string like ``"500MB"``, ``"2GB"``, ``"1.5GiB"``.

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB,
    GiB, TiB) powers of 1024, as in transformers. Raises :class:`ConfigError`.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", size)
        if m is None or m.group(2).upper() not in _UNITS:
            raise ConfigError(
                f"cannot parse size {size!r}. Use an integer number of bytes or a number with a "
                "unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)."
            )
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise ConfigError(f"size must be an int or a string like '2GB', got {type(size).__name__}.")
    if value <= 0:
        raise ConfigError(f"size must be positive, got {size!r}.")
    return value


def shard_file_name(index: int, count: int) -> str:
    """The transformers file name of shard ``index`` (0-based) out of ``count``."""
    if count == 1:
        return SINGLE_SHARD
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass
class Entry:
    """One tensor as a shard's header records it."""

    name: str
    dtype: str  # safetensors dtype name
    shape: list[int]  # header shape (values, not torch elements, for packed dtypes)
    nbytes: int
    itemsize: int
    pos: int = 0  # stream mode: byte position in its spill file


def make_entry(name: str, shape: Iterable[int], dtype: torch.dtype) -> Entry:
    """The header entry of a tensor named ``name`` with torch ``shape`` and ``dtype``."""
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise CheckpointError(f"bad tensor name {name!r}: use a non-empty string, not '__metadata__'.")
    dims = [int(s) for s in shape]
    if any(s < 0 for s in dims):
        raise CheckpointError(f"tensor '{name}' has a negative dimension in shape {dims}.")
    return Entry(name, dtype_name(dtype), header_shape(dtype, dims), math.prod(dims) * dtype.itemsize,
                 dtype.itemsize)


@dataclass
class OpenShard:
    """A shard being filled (stream mode), or a group of entries being planned (layout mode)."""

    entries: list[Entry] = field(default_factory=list)
    size: int = 0
    spills: dict[int, int] = field(default_factory=dict)  # itemsize -> bytes spilled

    def breaks_before(self, nbytes: int, limit: int) -> bool:
        """Shard rule: fill up to ``limit`` bytes; an oversized tensor gets a shard of its own."""
        return bool(self.entries) and (self.size + nbytes > limit or nbytes > limit)

    def add(self, entry: Entry) -> None:
        """Count ``entry`` in this shard."""
        self.entries.append(entry)
        self.size += entry.nbytes


def group(entries: list[Entry], limit: int) -> list[list[Entry]]:
    """Split entries, in order, into shards of at most ``limit`` bytes (see :meth:`OpenShard.breaks_before`)."""
    groups = [OpenShard()]
    for e in entries:
        if groups[-1].breaks_before(e.nbytes, limit):
            groups.append(OpenShard())
        groups[-1].add(e)
    return [g.entries for g in groups]


def lay_out(entries: list[Entry], metadata: dict[str, str]) -> tuple[bytes, dict[str, int], int]:
    """Order a shard's entries (element size, largest first, so that data stays aligned, as the
    safetensors library does) and return (header, data offset of each name, data size)."""
    ordered = sorted(entries, key=lambda e: -e.itemsize)
    offsets, header, pos = {}, {}, 0
    for e in ordered:
        offsets[e.name] = pos
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    return encode_header(header, metadata), offsets, pos
