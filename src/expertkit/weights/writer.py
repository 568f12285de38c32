"""Atomic, streaming, sharded safetensors writing.

:class:`ShardedWriter` writes tensors one at a time into shards named as
transformers names them (``model.safetensors``, or ``model-0000k-of-0000N``
shards plus ``model.safetensors.index.json``) inside a hidden temporary sibling
folder, fsyncs every file and renames the folder to ``out_dir`` at the very
end: a failed or interrupted write never leaves a (half-written) output folder.
The temporary folder is named after its owner process, so that the next write
to the same place removes it if that process was killed
(:func:`expertkit.fileio.sweep_stale`).

Resident memory stays at one tensor whatever the shard size. With a declared
``layout`` the shards are laid out (and preallocated) up front and each tensor
is written at its offset, in any order; without one, tensor bytes go to spill
files that are copied after the header (in the kernel, in bounded chunks) when
the shard closes. Within a shard tensors are ordered by element size, largest
first, so data stays aligned, as the safetensors library does; both modes write
the same bytes when tensors arrive in layout order. A finished shard is fsynced
on a background thread while the next one is written.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from expertkit.errors import CheckpointError, InputTypeError, unknown
from expertkit.fileio import fsync_path, replace_folder, temp_sibling
from expertkit.weights._layout import (
    INDEX_NAME,
    SINGLE_SHARD,
    Entry,
    OpenShard,
    group,
    lay_out,
    make_entry,
    parse_size,
    shard_file_name,
)
if TYPE_CHECKING:
    from expertkit.weights.reader import Checkpoint

from expertkit.weights._shardio import FileRange, Flusher, copy_all, preallocate, put, pwrite_all, tensor_bytes

__all__ = ["INDEX_NAME", "SINGLE_SHARD", "TEMPLATE_FILES", "ShardedWriter", "parse_size", "save_state_dict",
           "shard_file_name", "tensor_bytes"]

TEMPLATE_FILES: tuple[str, ...] = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "spiece.model",
)
DEFAULT_METADATA = {"format": "pt"}
LayoutItem = tuple[str, Iterable[int], torch.dtype]


def _cleanup(tmp: Path, fds: dict[Any, int], flusher: Flusher) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
    flusher.close()
    shutil.rmtree(tmp, ignore_errors=True)


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
        self.tmp_dir = temp_sibling(self.out_dir, "tmp")  # sweeps folders of killed writers first
        self._fds: dict[Any, int] = {}
        self._flusher = Flusher()
        self._finalizer = weakref.finalize(self, _cleanup, self.tmp_dir, self._fds, self._flusher)
        self._state = "open"
        self._written: dict[str, int] = {}  # name -> nbytes
        self._shard_of: dict[str, int] = {}
        self._shard_names: list[str] = []
        self._flushed: set[int] = set()  # shards handed to the flusher
        self._layout: dict[str, tuple[Entry, int, int]] | None = None  # name -> (entry, shard, abs offset)
        self._pending: list[int] = []  # layout mode: tensors still to write per shard
        self._open = OpenShard()  # stream mode
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

    # ------------------------------------------------------------------ layout mode
    def _prepare_layout(self, layout: Iterable[LayoutItem]) -> None:
        items = [(i.name, i.shape, i.dtype) if hasattr(i, "dtype") else i for i in layout]  # TensorInfo too
        entries = [make_entry(name, shape, dtype) for name, shape, dtype in items]
        if dupes := sorted(n for n, c in collections.Counter(e.name for e in entries).items() if c > 1):
            raise CheckpointError(f"tensor '{dupes[0]}' appears twice in the layout; names must be unique.")
        if not entries:
            raise CheckpointError("the layout is empty; declare at least one tensor or pass layout=None.")
        groups = group(entries, self.max_shard_size)
        self._layout = {}
        for k, members in enumerate(groups):
            fname = shard_file_name(k, len(groups))
            header, offsets, size = lay_out(members, self.metadata)
            path = self.tmp_dir / fname
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                pwrite_all(fd, memoryview(header), 0)
                os.ftruncate(fd, len(header) + size)
                preallocate(fd, len(header) + size, str(path))  # a full disk fails here, before any work
            finally:
                os.close(fd)
            for e in members:
                self._layout[e.name] = (e, k, len(header) + offsets[e.name])
            self._shard_names.append(fname)
            self._pending.append(sum(1 for e in members if e.nbytes))

    def _write_at(self, entry: Entry, shard: int, offset: int, data: memoryview | FileRange) -> None:
        if not entry.nbytes:
            return
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.tmp_dir / self._shard_names[shard], os.O_WRONLY)
        put(fd, data, offset)
        self._pending[shard] -= 1
        if self._pending[shard] == 0:  # shard complete: flush it in the background, release its handle
            self._flusher.submit(self._fds.pop(shard))
            self._flushed.add(shard)

    # ------------------------------------------------------------------ stream mode
    def _append(self, entry: Entry, data: memoryview | FileRange) -> None:
        if self._open.breaks_before(entry.nbytes, self.max_shard_size):
            self._seal()
        shard = self._open
        key = ("spill", entry.itemsize)
        if entry.nbytes and key not in self._fds:
            spill = self.tmp_dir / f".spill-{entry.itemsize}"
            self._fds[key] = os.open(spill, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        entry.pos = shard.spills.get(entry.itemsize, 0)
        if entry.nbytes:
            put(self._fds[key], data, entry.pos)
        shard.spills[entry.itemsize] = entry.pos + entry.nbytes
        shard.add(entry)

    def _seal(self) -> None:
        """Close the open shard: header, then each spill file's bytes after it."""
        shard = self._open
        if not shard.entries:
            return
        header, _, size = lay_out(shard.entries, self.metadata)
        k = len(self._shard_names)
        fname = f".part-{k:05d}"
        path = self.tmp_dir / fname
        fd = self._fds["part"] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        preallocate(fd, len(header) + size, str(path))
        pwrite_all(fd, memoryview(header), 0)
        pos = len(header)
        for itemsize in sorted(shard.spills, reverse=True):
            count = shard.spills[itemsize]
            if count:
                copy_all(self._fds[("spill", itemsize)], fd, count, pos)
                pos += count
        self._flusher.submit(self._fds.pop("part"))
        self._flushed.add(k)
        for e in shard.entries:
            self._shard_of[e.name] = k
        self._shard_names.append(fname)
        self._open = OpenShard()

    # ------------------------------------------------------------------ public API
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor. Raises :class:`CheckpointError` on a duplicate or undeclared name.

        The tensor's bytes are written before this returns: the caller may reuse its memory.
        """
        self._check_new(name)
        if not isinstance(tensor, torch.Tensor):
            raise InputTypeError(f"tensor '{name}' is a {type(tensor).__name__}, not a torch.Tensor.")
        self._put(make_entry(name, tensor.shape, tensor.dtype), tensor_bytes(tensor))

    def add_from(self, name: str, source: Checkpoint, source_name: str | None = None) -> None:
        """Write tensor ``source_name`` (default ``name``) of ``source`` unchanged, under ``name``.

        The bytes are copied file to file in the kernel (``copy_file_range``), so they never enter
        this process's memory: a pass-through copy of a tensor larger than what a streaming pass
        otherwise holds (a token embedding) does not raise its peak. A pickled source is read and added.
        """
        self._check_new(name)
        where = source.file_range(source_name or name)
        if where is None:
            self.add(name, source.read(source_name or name))
            return
        info = source.info(source_name or name)
        self._put(make_entry(name, info.shape, info.dtype), FileRange(*where))

    def _check_new(self, name: str) -> None:
        """Refuse a tensor the writer cannot take: closed writer, duplicate, or a name the layout lacks."""
        self._check_open()
        if name in self._written:
            raise CheckpointError(f"tensor '{name}' was already added; tensor names must be unique.")
        if self._layout is not None and name not in self._layout:
            raise unknown("tensor", name, self._layout)

    def _put(self, entry: Entry, data: memoryview | FileRange) -> None:
        name = entry.name
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
            self._check_target()
            replace_folder(self.tmp_dir, self.out_dir)
            self._finalizer.detach()
            self._flusher.close()
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
            shard_of = self._shard_of
        self._flusher.wait()  # every shard flushed in the background is on disk now
        count = len(self._shard_names)
        for k, part in enumerate(self._shard_names):
            fname = shard_file_name(k, count)
            if part != fname:  # stream mode: parts get their final names
                os.replace(self.tmp_dir / part, self.tmp_dir / fname)
                self._shard_names[k] = fname
            if k not in self._flushed:  # layout-mode shards holding only empty tensors
                fsync_path(self.tmp_dir / fname)
        if count > 1:
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
