"""Merge inputs read tensor by tensor: model folders, bundled names, and LoRA adapters over a base.

A model reference (a string in a merge config) is one of:

* a local Hugging Face folder (safetensors) or a bundled name (``smollm2-135m``);
* ``BASE+ADAPTER`` (mergekit's syntax): a PEFT LoRA adapter folder applied to a base model;
* a PEFT adapter folder alone (it holds ``adapter_config.json``): applied to the config's
  ``base_model``.

A LoRA input is never written out merged: :class:`LoraSource` reads the base tensor and adds
``B @ A_scaled`` (the adapter's low-rank factors, scale folded in) when the tensor is read;
tensors the adapter replaces (``modules_to_save``) come from the adapter. Only the small factors
are held in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import CheckpointError, ConfigError
from expertkit.weights.lora import CONFIG_NAME, LoraAdapter
from expertkit.weights.reader import Checkpoint


class FolderSource:
    """A checkpoint folder read lazily (one tensor at a time)."""

    def __init__(self, ref: str, folder: Path, *, allow_pickle: bool = False) -> None:
        self.ref = ref
        self.folder = folder
        self.ckpt = Checkpoint(folder, allow_pickle=allow_pickle)
        self.config: dict[str, Any] = self.ckpt.config or {}

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return self.ckpt.names()

    def __contains__(self, name: object) -> bool:
        return name in self.ckpt

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor (header only)."""
        return self.ckpt.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of one tensor (header only)."""
        return self.ckpt.info(name).dtype

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        return self.ckpt.read(name)

    def view(self, name: str) -> torch.Tensor:
        """One tensor mapped copy-on-write, not read (see :meth:`Checkpoint.view`)."""
        return self.ckpt.view(name)

    def close(self) -> None:
        """Close the checkpoint's files."""
        self.ckpt.close()


class LoraSource:
    """A base model plus a PEFT LoRA adapter, merged lazily as each tensor is read."""

    def __init__(self, ref: str, base: FolderSource, adapter_dir: Path, *, allow_pickle: bool = False) -> None:
        self.ref = ref
        self.base = base
        self.folder = base.folder
        self.config = base.config
        with LoraAdapter.open(adapter_dir, allow_pickle=allow_pickle) as adapter:
            adapter.align_to({n: base.shape(n) for n in base.names()})
            # (d0, r) and (r, d1) factors in the base tensor's layout, scale folded into A
            self.factors = {name: (a, b) for name, a, b in adapter.factors()}
            self.bias = dict(adapter.bias_deltas())
            self.replaced = dict(adapter.replacements())
        unknown_targets = [n for n in [*self.factors, *self.bias, *self.replaced] if n not in base]
        if unknown_targets:
            raise CheckpointError(
                f"adapter {adapter_dir} targets tensors the base {base.ref} does not have "
                f"({', '.join(unknown_targets[:3])}); it was trained on another base model.")

    def names(self) -> list[str]:
        """The base model's tensor names."""
        return self.base.names()

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor."""
        return tuple(self.replaced[name].shape) if name in self.replaced else self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of one tensor (the base's)."""
        return self.base.dtype(name)

    def read(self, name: str) -> torch.Tensor:
        """The base tensor plus the adapter's delta (or the adapter's replacement), in the base dtype."""
        return self.apply(name, None if name in self.replaced else self.base.read(name))

    def apply(self, name: str, t: torch.Tensor | None) -> torch.Tensor:
        """``t`` (the base's tensor ``name``, not modified) with the adapter applied; a new tensor."""
        if name in self.replaced:
            return self.replaced[name].to(self.base.dtype(name), copy=True)
        assert t is not None  # read() passes the base tensor for every non-replaced name
        delta = None
        if name in self.factors:
            a, b = self.factors[name]
            delta = b @ a  # (d0, r) @ (r, d1) -> (d0, d1)
        elif name in self.bias:
            delta = self.bias[name]
        if delta is None:
            return t
        return (t.to(torch.promote_types(t.dtype, torch.float32)) + delta).to(t.dtype)

    def close(self) -> None:
        """Nothing to close (the base is closed by its owner)."""


Source = FolderSource | LoraSource


def is_adapter(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a PEFT ``adapter_config.json``."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def resolve_folder(ref: str) -> Path:
    """A local folder for a bundled name or a path; hub ids are refused (merges read local files)."""
    from expertkit.models.loader import resolve

    try:
        kind, folder = resolve(ref)
    except CheckpointError as exc:
        if "quickstart" in Path(ref).parts and not Path(ref).exists():
            raise CheckpointError(f"{exc} The quickstart's experts are written by `make run` (the quickstart "
                                  "run); run it first.") from None
        raise
    if folder is None:
        raise CheckpointError(f"'{ref}' looks like a hub id; merging reads local folders only. "
                              "Download the model first and pass its folder.")
    return folder


class SourceSet:
    """Opens each distinct model reference once (a base shared by many adapters is opened once)."""

    def __init__(self, *, base_ref: str | None = None, allow_pickle: bool = False) -> None:
        self.base_ref = base_ref
        self.allow_pickle = allow_pickle
        self._folders: dict[Path, FolderSource] = {}
        self._sources: dict[str, Source] = {}

    def _folder(self, ref: str) -> FolderSource:
        folder = resolve_folder(ref).resolve()
        if folder not in self._folders:
            self._folders[folder] = FolderSource(ref, folder, allow_pickle=self.allow_pickle)
        return self._folders[folder]

    def get(self, ref: str) -> Source:
        """The source for ``ref`` (see the module docstring for the forms)."""
        if ref in self._sources:
            return self._sources[ref]
        if "+" in ref and not Path(ref).expanduser().exists():
            base_ref, adapter = ref.split("+", 1)
            src: Source = LoraSource(ref, self._folder(base_ref), Path(adapter).expanduser(),
                                     allow_pickle=self.allow_pickle)
        elif is_adapter(ref):
            if self.base_ref is None:
                raise ConfigError(f"'{ref}' is a LoRA adapter; give base_model in the config (the model it was "
                                  "trained on), or write it as BASE+ADAPTER.")
            base_ref = self.base_ref.split("+", 1)[0]
            src = LoraSource(ref, self._folder(base_ref), Path(ref).expanduser(), allow_pickle=self.allow_pickle)
        else:
            src = self._folder(ref)
        self._sources[ref] = src
        return src

    def close(self) -> None:
        """Close every opened checkpoint."""
        for f in self._folders.values():
            f.close()
        self._folders.clear()
        self._sources.clear()


def read_tokenizer_vocab(folder: Path) -> dict[str, int] | None:
    """token -> id of a folder's ``tokenizer.json`` (model vocabulary plus added tokens), or None."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc}).") from exc
    raw = (data.get("model") or {}).get("vocab") or {}
    # BPE/WordPiece: {token: id}; Unigram: [[token, score], ...]
    vocab = {tok: i for i, (tok, _) in enumerate(raw)} if isinstance(raw, list) else dict(raw)
    for entry in data.get("added_tokens") or []:
        vocab[entry["content"]] = int(entry["id"])
    return vocab
