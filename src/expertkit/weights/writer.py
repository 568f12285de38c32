"""Atomic, streaming, sharded safetensors writing.

:class:`ShardedWriter` writes tensors one at a time into shards named as
transformers names them (``model.safetensors``, or ``model-0000k-of-0000N``
shards plus ``model.safetensors.index.json``) inside a hidden temporary sibling
folder, fsyncs every file and renames the folder to ``out_dir`` at the very
end: a failed or interrupted write never leaves a (half-written) output folder.

Resident memory stays at one tensor whatever the shard size. With a declared
``layout`` the shards are laid out up front and each tensor is written at its
offset, in any order; without one, tensor bytes go to spill files that are
copied after the header (in the kernel, in bounded chunks) when the shard
closes. Within a shard tensors are ordered by element size, largest first, so
data stays aligned, as the safetensors library does; both modes write the same
bytes when tensors arrive in layout order.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import CheckpointError, ConfigError, InputTypeError, unknown
from expertkit.fileio import fsync_path
from expertkit.weights._format import dtype_name, encode_header

TEMPLATE_FILES: tuple[str, ...] = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "spiece.model",
)
SINGLE_SHARD = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_METADATA = {"format": "pt"}
_CHUNK = 16 * 1024 * 1024
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
LayoutItem = tuple[str, Iterable[int], torch.dtype]


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


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a CPU tensor's data, sharing its memory (copies only if needed)."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"expected a torch.Tensor, got {type(t).__name__}.")
    if t.layout != torch.strided or t.is_meta:
        raise CheckpointError(f"cannot save a {t.layout}/meta tensor; make it a dense tensor with data.")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)  # (numel,)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())  # (nbytes,)


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf[:_CHUNK * 64], offset)
        buf, offset = buf[n:], offset + n


def _copy_all(src: int, dst: int, count: int, dst_offset: int) -> None:
    """Copy ``count`` bytes from the start of ``src`` to ``dst_offset`` in bounded chunks."""
    done = 0
    while done < count:
        try:  # in-kernel copy; falls back to pread/pwrite where unsupported
            n = os.copy_file_range(src, dst, min(_CHUNK * 4, count - done), done, dst_offset + done)
        except OSError:
            n = 0
        if n <= 0:
            chunk = os.pread(src, min(_CHUNK, count - done), done)
            if not chunk:
                raise CheckpointError("a spill file ended early while writing a shard; is the disk full?")
            _pwrite_all(dst, memoryview(chunk), dst_offset + done)
            n = len(chunk)
        done += n



def _cleanup(tmp: Path, fds: dict[Any, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class _Entry:
    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    itemsize: int
    pos: int = 0  # stream mode: byte position in its spill file


@dataclass
class _OpenShard:
    entries: list[_Entry] = field(default_factory=list)
    size: int = 0
    spills: dict[int, int] = field(default_factory=dict)  # itemsize -> bytes spilled


def _lay_out(entries: list[_Entry], metadata: dict[str, str]) -> tuple[bytes, dict[str, int], int]:
    """Order a shard's entries (element size, largest first) and return (header, data offsets, data size)."""
    ordered = sorted(entries, key=lambda e: -e.itemsize)
    offsets, header, pos = {}, {}, 0
    for e in ordered:
        offsets[e.name] = pos
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    return encode_header(header, metadata), offsets, pos


class ShardedWriter:
    """Write a checkpoint folder tensor by tensor, atomically.

    Args:
        out_dir: the folder to create.
        max_shard_size: bytes per shard (int or ``"2GB"``-style string); a bigger tensor gets its own shard.
        template: a model folder whose config and tokenizer files (:data:`TEMPLATE_FILES`) are copied.
        metadata: safetensors ``__metadata__`` added to every shard (``format: pt`` is always set).
        overwrite: replace an existing ``out_dir`` (only once the new folder is complete).
        layout: ``(name, shape, dtype)`` (or a reader ``TensorInfo``) of every tensor to come; enables
            offset writes in any order, and :meth:`finish` checks that each was written.
        on_tensor: called with each tensor name after it is written (progress hook).

    Use as a context manager: an exception inside the block aborts (no output), a normal exit finishes.
    """

    def __init__(  # noqa: PLR0913 - keyword-only options
        self, out_dir: str | os.PathLike[str], *, max_shard_size: int | str = "2GB",
        template: str | os.PathLike[str] | None = None, metadata: Mapping[str, str] | None = None,
        overwrite: bool = False, layout: Iterable[LayoutItem] | None = None,
        on_tensor: Callable[[str], None] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir).absolute()
        self.max_shard_size = parse_size(max_shard_size)
        self.template = Path(template) if template is not None else None
        self.metadata = {**DEFAULT_METADATA, **{str(k): str(v) for k, v in (metadata or {}).items()}}
        self.overwrite = overwrite
        self.on_tensor = on_tensor
        if self.template is not None and not self.template.is_dir():
            raise CheckpointError(f"template folder not found: {self.template}. Pass a model folder or None.")
        self._check_target()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{secrets.token_hex(4)}"
        self.tmp_dir.mkdir()
        self._fds: dict[Any, int] = {}
        self._finalizer = weakref.finalize(self, _cleanup, self.tmp_dir, self._fds)
        self._state = "open"
        self._written: dict[str, int] = {}  # name -> nbytes
        self._shard_of: dict[str, int] = {}
        self._shard_names: list[str] = []
        self._layout: dict[str, tuple[_Entry, int, int]] | None = None  # name -> (entry, shard, abs offset)
        self._pending: list[int] = []  # layout mode: tensors still to write per shard
        self._open = _OpenShard()  # stream mode
        try:
            if layout is not None:
                self._prepare_layout(layout)
        except BaseException:
            self.abort()
            raise

    def _check_open(self) -> None:
        if self._state != "open":
            raise CheckpointError(f"the writer for {self.out_dir} is {self._state}; start a new one.")

    def _check_target(self) -> None:
        if (self.out_dir.exists() or self.out_dir.is_symlink()) and not self.overwrite:
            raise CheckpointError(
                f"output folder exists: {self.out_dir}. Choose another path or pass overwrite=True.")

    def _entry(self, name: str, shape: Iterable[int], dtype: torch.dtype) -> _Entry:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise CheckpointError(f"bad tensor name {name!r}: use a non-empty string, not '__metadata__'.")
        shape = [int(s) for s in shape]
        itemsize = dtype.itemsize
        return _Entry(name, dtype_name(dtype), shape, math.prod(shape) * itemsize, itemsize)

    def _breaks_before(self, shard: _OpenShard, nbytes: int) -> bool:
        """Shard rule: fill up to max_shard_size; an oversized tensor gets a shard of its own."""
        limit = self.max_shard_size
        return bool(shard.entries) and (shard.size + nbytes > limit or nbytes > limit)

    def _groups(self, entries: list[_Entry]) -> list[list[_Entry]]:
        groups = [_OpenShard()]
        for e in entries:
            if self._breaks_before(groups[-1], e.nbytes):
                groups.append(_OpenShard())
            groups[-1].entries.append(e)
            groups[-1].size += e.nbytes
        return [g.entries for g in groups]

    def _prepare_layout(self, layout: Iterable[LayoutItem]) -> None:
        items = [(i.name, i.shape, i.dtype) if hasattr(i, "dtype") else i for i in layout]  # TensorInfo too
        entries = [self._entry(name, shape, dtype) for name, shape, dtype in items]
        if dupes := sorted(n for n, c in collections.Counter(e.name for e in entries).items() if c > 1):
            raise CheckpointError(f"tensor '{dupes[0]}' appears twice in the layout; names must be unique.")
        if not entries:
            raise CheckpointError("the layout is empty; declare at least one tensor or pass layout=None.")
        groups = self._groups(entries)
        self._layout = {}
        for k, group in enumerate(groups):
            fname = shard_file_name(k, len(groups))
            header, offsets, size = _lay_out(group, self.metadata)
            with open(self.tmp_dir / fname, "wb") as fh:
                fh.write(header)
                fh.truncate(len(header) + size)
            for e in group:
                self._layout[e.name] = (e, k, len(header) + offsets[e.name])
            self._shard_names.append(fname)
            self._pending.append(sum(1 for e in group if e.nbytes))

    def _write_at(self, entry: _Entry, shard: int, offset: int, data: memoryview) -> None:
        if not entry.nbytes:
            return
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.tmp_dir / self._shard_names[shard], os.O_WRONLY)
        _pwrite_all(fd, data, offset)
        self._pending[shard] -= 1
        if self._pending[shard] == 0:  # shard complete: flush and release its handle
            os.fsync(fd)
            os.close(self._fds.pop(shard))

    def _append(self, entry: _Entry, data: memoryview) -> None:
        if self._breaks_before(self._open, entry.nbytes):
            self._seal()
        shard = self._open
        key = ("spill", entry.itemsize)
        if entry.nbytes and key not in self._fds:
            spill = self.tmp_dir / f".spill-{entry.itemsize}"
            self._fds[key] = os.open(spill, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        entry.pos = shard.spills.get(entry.itemsize, 0)
        if entry.nbytes:
            _pwrite_all(self._fds[key], data, entry.pos)
        shard.spills[entry.itemsize] = entry.pos + entry.nbytes
        shard.entries.append(entry)
        shard.size += entry.nbytes

    def _seal(self) -> None:
        """Close the open shard: header, then each spill file's bytes after it."""
        shard = self._open
        if not shard.entries:
            return
        header, _, _ = _lay_out(shard.entries, self.metadata)
        k = len(self._shard_names)
        fname = f".part-{k:05d}"
        fd = self._fds["part"] = os.open(self.tmp_dir / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        _pwrite_all(fd, memoryview(header), 0)
        pos = len(header)
        for itemsize in sorted(shard.spills, reverse=True):
            count = shard.spills[itemsize]
            if count:
                _copy_all(self._fds[("spill", itemsize)], fd, count, pos)
                pos += count
        os.fsync(fd)
        os.close(self._fds.pop("part"))
        for e in shard.entries:
            self._shard_of[e.name] = k
        self._shard_names.append(fname)
        self._open = _OpenShard()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor. Raises :class:`CheckpointError` on a duplicate or undeclared name."""
        self._check_open()
        if name in self._written:
            raise CheckpointError(f"tensor '{name}' was already added; tensor names must be unique.")
        if not isinstance(tensor, torch.Tensor):
            raise InputTypeError(f"tensor '{name}' is a {type(tensor).__name__}, not a torch.Tensor.")
        if self._layout is not None and name not in self._layout:
            raise unknown("tensor", name, self._layout)
        entry = self._entry(name, tensor.shape, tensor.dtype)
        data = tensor_bytes(tensor)
        if self._layout is not None:
            declared, shard, offset = self._layout[name]
            if (declared.shape, declared.dtype) != (entry.shape, entry.dtype):
                raise CheckpointError(f"tensor '{name}' is {entry.dtype} {entry.shape} but the layout "
                                      f"declares {declared.dtype} {declared.shape}; fix one of them.")
            self._write_at(declared, shard, offset, data)
        else:
            self._append(entry, data)
        self._written[name] = entry.nbytes
        if self.on_tensor is not None:
            self.on_tensor(name)

    def finish(self) -> Path:
        """Complete the checkpoint and move it into place; returns ``out_dir``. On error, leaves nothing."""
        self._check_open()
        try:
            self._complete()
            self._install()
        except BaseException:
            self.abort()
            raise
        self._state = "finished"
        return self.out_dir

    def _complete(self) -> None:
        if self._layout is not None:
            if missing := [n for n in self._layout if n not in self._written]:
                raise CheckpointError(
                    f"{len(missing)} tensor(s) declared in the layout were never added "
                    f"(first: {', '.join(missing[:5])}); add them or drop them from the layout."
                )
            shard_of = {n: k for n, (_, k, _) in self._layout.items()}
        else:
            if not self._written:
                raise CheckpointError(f"no tensors were added to {self.out_dir}; nothing to write.")
            self._seal()
            for key in [k for k in self._fds if isinstance(k, tuple)]:  # spill files
                os.close(self._fds.pop(key))
                (self.tmp_dir / f".spill-{key[1]}").unlink()
            count = len(self._shard_names)
            for k, part in enumerate(self._shard_names):
                self._shard_names[k] = shard_file_name(k, count)
                os.replace(self.tmp_dir / part, self.tmp_dir / self._shard_names[k])
            shard_of = self._shard_of
        for fname in self._shard_names:  # cheap for shards already flushed when they completed
            fsync_path(self.tmp_dir / fname)
        if len(self._shard_names) > 1:
            index = {"metadata": {"total_size": sum(self._written.values())},
                     "weight_map": {n: self._shard_names[shard_of[n]] for n in sorted(shard_of)}}
            (self.tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            fsync_path(self.tmp_dir / INDEX_NAME)
        if self.template is not None:
            for fname in TEMPLATE_FILES:
                if (self.template / fname).is_file():
                    shutil.copyfile(self.template / fname, self.tmp_dir / fname)
                    fsync_path(self.tmp_dir / fname)
        fsync_path(self.tmp_dir)

    def _install(self) -> None:
        """Rename the finished temporary folder to out_dir (replacing an old one if allowed)."""
        self._check_target()
        old: Path | None = None
        if self.out_dir.exists() or self.out_dir.is_symlink():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{secrets.token_hex(4)}"
            os.replace(self.out_dir, old)
        try:
            os.replace(self.tmp_dir, self.out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, self.out_dir)
            raise
        self._finalizer.detach()
        fsync_path(self.out_dir.parent)
        if old is not None and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            old.unlink()

    def abort(self) -> None:
        """Discard everything written so far; no output is left. Safe to call twice."""
        self._finalizer()
        if self._state == "open":
            self._state = "aborted"

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finish()


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], out_dir: str | os.PathLike[str], **kwargs: Any
) -> Path:
    """Write a whole state dict as a (sharded) checkpoint folder; ``kwargs`` go to :class:`ShardedWriter`."""
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"state_dict['{name}'] is a {type(t).__name__}, not a torch.Tensor.")
    kwargs.setdefault("layout", [(n, t.shape, t.dtype) for n, t in state_dict.items()])
    with ShardedWriter(out_dir, **kwargs) as writer:
        for name, t in state_dict.items():
            writer.add(name, t)
    return writer.out_dir
