"""Lazy, tensor-by-tensor reading of checkpoint folders.

A :class:`Checkpoint` opens a folder holding one ``model.safetensors`` or a
sharded set with ``model.safetensors.index.json`` (or any ``*.safetensors``
files). Listing names, shapes and dtypes reads only the headers; :meth:`read`
reads one tensor's bytes straight into a fresh tensor; :meth:`view` maps them (copy-on-write)
without reading. Each shard has at most
one open file handle, opened on first use and closed by :meth:`close`.

Pickle checkpoints (``.bin``, ``.pt``, ``.pth``) are refused: loading a pickle
runs arbitrary code. Pass ``allow_pickle=True`` to load them with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from expertkit.errors import CheckpointError, PickleRefusedError, unknown
from expertkit.weights._format import parse_header
from expertkit.weights._shardio import pread_into

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "adapter_model.safetensors.index.json")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: str  # file name inside the checkpoint folder
    offset: int  # absolute byte offset of the data in the shard (0 for pickles)
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def _pickle_error(path: Path) -> PickleRefusedError:
    return PickleRefusedError(
        f"{path} is a pickle checkpoint; loading a pickle runs arbitrary code, so expertkit "
        "refuses it. Convert it to safetensors, or opt in with allow_pickle=True "
        "(CLI: --allow-pickle), which loads it with torch.load(weights_only=True)."
    )


def _index_shards(index: Path) -> list[str]:
    """The shard file names an index names, checked: plain file names inside its folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: corrupt index ({str(exc)[:200]}).") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: corrupt index (weight_map is not an object).")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or shard in (".", "..") or Path(shard).name != shard \
                or "\\" in shard:
            raise CheckpointError(f"{index}: the index puts tensor '{name}' in {shard!r}, which is not a file "
                                  "name in the checkpoint folder; the index is corrupt.")
    return sorted(set(weight_map.values()))


class Checkpoint:
    """A lazily read checkpoint folder (or single weights file).

    Use as a context manager, or call :meth:`close` when done::

        with Checkpoint("path/to/model") as ckpt:
            for name in ckpt.names():
                t = ckpt.read(name)
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[str, BinaryIO] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        self.metadata: dict[str, str] = {}
        if not self.path.exists():
            raise CheckpointError(f"checkpoint not found: {self.path}. Check the path.")
        self._scan()

    # ----------------------------------------------------------------- discovery
    def _weight_files(self) -> tuple[Path, list[str]]:
        """Return (folder, list of shard file names) after the pickle check."""
        if self.path.is_file():
            if self.path.suffix in PICKLE_SUFFIXES:
                return self.path.parent, [self.path.name]
            if self.path.suffix != ".safetensors":
                raise CheckpointError(
                    f"{self.path} is not a safetensors file. Pass a checkpoint folder or a .safetensors file."
                )
            return self.path.parent, [self.path.name]
        folder = self.path
        for index_name in INDEX_NAMES:
            index = folder / index_name
            if index.exists():
                shards = _index_shards(index)
                missing = [s for s in shards if not (folder / s).exists()]
                if missing:
                    raise CheckpointError(
                        f"{folder}: the index names shards that are missing: {', '.join(missing)}. "
                        "The checkpoint is incomplete; copy it again."
                    )
                return folder, shards
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if shards:
            return folder, shards
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            return folder, pickles
        raise CheckpointError(
            f"{folder} holds no weights (no *.safetensors, no index.json). "
            "Pass a folder written by save_pretrained or by expertkit."
        )

    def _scan(self) -> None:
        folder, shards = self._weight_files()
        self.folder = folder
        for shard in shards:
            path = folder / shard
            if path.suffix in PICKLE_SUFFIXES:
                if not self.allow_pickle:
                    raise _pickle_error(path)
                self._scan_pickle(path)
                continue
            with open(path, "rb") as fh:
                start, metadata, entries = parse_header(fh, str(path), os.fstat(fh.fileno()).st_size)
            self.metadata.update(metadata)
            for e in entries:
                if e.name in self._infos:
                    raise CheckpointError(f"{folder}: tensor '{e.name}' appears in two shards.")
                self._infos[e.name] = TensorInfo(e.name, e.shape, e.dtype, shard, start + e.begin, e.end - e.begin)

    def _scan_pickle(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds here
            raise CheckpointError(f"{path}: cannot load with weights_only=True ({exc}).") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}.")
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self._pickled[path.name] = tensors
        for name, t in tensors.items():
            self._infos[name] = TensorInfo(
                name, tuple(t.shape), t.dtype, path.name, 0, t.numel() * t.element_size()
            )

    # ------------------------------------------------------------------ listing
    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard, by offset)."""
        return [i.name for i in sorted(self._infos.values(), key=lambda i: (i.shard, i.offset))]

    def infos(self) -> list[TensorInfo]:
        """All tensor infos in file order."""
        return [self._infos[n] for n in self.names()]

    def info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of one tensor."""
        try:
            return self._infos[name]
        except KeyError:
            raise unknown("tensor", name, self._infos) from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    @property
    def shards(self) -> list[str]:
        """Shard file names."""
        return sorted({i.shard for i in self._infos.values()})

    @property
    def num_parameters(self) -> int:
        """Total number of elements over all tensors."""
        return sum(i.numel for i in self._infos.values())

    @property
    def size_on_disk(self) -> int:
        """Bytes of all weight files (plus index), excluding config and tokenizer files."""
        total = sum((self.folder / s).stat().st_size for s in self.shards)
        for index_name in INDEX_NAMES:
            if (self.folder / index_name).exists():
                total += (self.folder / index_name).stat().st_size
        return total

    @property
    def config(self) -> dict[str, Any] | None:
        """The folder's ``config.json`` as a dict, or None when absent."""
        cfg = self.folder / "config.json"
        if not cfg.exists():
            return None
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg}: invalid JSON ({exc}).") from exc

    # ------------------------------------------------------------------ reading
    def _handle(self, shard: str) -> BinaryIO:
        fh = self._handles.get(shard)
        if fh is None:
            fh = open(self.folder / shard, "rb")  # noqa: SIM115 - kept open, closed in close()
            self._handles[shard] = fh
        return fh

    def _read_into(self, info: TensorInfo, buf: memoryview) -> None:
        """Read one tensor's bytes into ``buf`` (exactly ``info.nbytes`` long)."""
        fd = self._handle(info.shard).fileno()
        got = pread_into(fd, buf, info.offset)
        if got != len(buf) or got != info.nbytes:  # the file changed since it was opened
            raise CheckpointError(
                f"{self.folder / info.shard}: short read of '{info.name}' ({got} of {info.nbytes} bytes); "
                "the file was truncated or replaced while open."
            )

    def read(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor into a new CPU tensor (optionally cast to ``dtype``)."""
        info = self.info(name)
        if info.shard in self._pickled:
            t = self._pickled[info.shard][name]
        else:
            t = torch.empty(info.shape, dtype=info.dtype)
            if info.nbytes:
                self._read_into(info, memoryview(t.view(-1).view(torch.uint8).numpy()))  # (nbytes,)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def file_range(self, name: str) -> tuple[int, int, int] | None:
        """``(fd, offset, nbytes)`` of one tensor's bytes in its open shard (for an in-kernel copy,
        :meth:`ShardedWriter.add_from <expertkit.weights.ShardedWriter.add_from>`); ``None`` for a
        pickled tensor, which has no bytes on disk to copy."""
        info = self.info(name)
        if info.shard in self._pickled:
            return None
        return self._handle(info.shard).fileno(), info.offset, info.nbytes

    def view(self, name: str) -> torch.Tensor:
        """One tensor as a copy-on-write memory map of its bytes: nothing is read or copied up front.

        Pages come from the page cache as they are touched, so a tensor that is only read (e.g. an
        input of a weighted sum) costs no copy; writes to it stay private to the process (the file
        is never changed). The mapping lives as long as the tensor. Pickled and empty tensors are
        returned as :meth:`read` returns them.
        """
        info = self.info(name)
        if info.shard in self._pickled or not info.nbytes:
            return self.read(name)
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY  # mappings start page-aligned
        fd = self._handle(info.shard).fileno()
        try:
            mapped = mmap.mmap(fd, info.offset + info.nbytes - start, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.folder / info.shard}: cannot map '{name}' ({exc}).") from exc
        flat = torch.frombuffer(mapped, dtype=info.dtype, offset=info.offset - start,
                                count=info.nbytes // info.dtype.itemsize)
        return flat.view(info.shape)

    def iter_tensors(self, names: list[str] | None = None, *,
                     reuse_buffer: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, in file order by default.

        With ``reuse_buffer=True`` every tensor is read into one buffer, sized for the largest: a
        yielded tensor is valid only until the next one is yielded (copy it to keep it). This
        skips the allocation and first-touch page faults of a fresh tensor per read (measured in
        docs/benchmarks.md), for a read-then-write loop such as re-sharding a checkpoint.
        """
        names = names if names is not None else self.names()
        if not reuse_buffer:
            for name in names:
                yield name, self.read(name)
            return
        infos = [self.info(n) for n in names]
        on_disk = [i for i in infos if i.shard not in self._pickled]
        buffer = torch.empty(max((i.nbytes for i in on_disk), default=0), dtype=torch.uint8)  # (bytes,)
        for info in infos:
            if info.shard in self._pickled or not info.nbytes:
                yield info.name, self.read(info.name)
                continue
            raw = buffer[: info.nbytes]  # (nbytes,)
            self._read_into(info, memoryview(raw.numpy()))
            yield info.name, raw.view(info.dtype).view(info.shape)

    def close(self) -> None:
        """Close every open shard handle."""
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self)}, shards={len(self.shards)})"
