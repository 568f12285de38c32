"""Zoo inputs: Hugging Face model folders, PEFT LoRA adapters, and folders of them.

:func:`discover_zoo` turns paths into :class:`ZooMember`\\ s:

* a folder with ``adapter_config.json`` is a LoRA adapter; its base is the ``base`` argument, else
  ``base_model_name_or_path`` of the adapter config (a bundled name such as ``smollm2-135m`` or a
  local folder);
* a folder with ``config.json`` and safetensors weights is a full model;
* any other folder is searched one level down (and in its ``experts/`` sub-folder), so the
  quickstart's ``runs/quickstart`` or ``runs/quickstart/experts`` give its four experts.

A member's tasks come from its ``expertkit.json`` (written by ``train_lora``), else are empty.

:class:`MemberWeights` reads a member's full weights **one tensor at a time**: for a model,
straight from its checkpoint; for an adapter, ``base + scale * B @ A`` (the adapter's
replacements taking the place of base tensors), i.e. PEFT's ``merge_and_unload`` computed per
tensor, never writing a merged copy. The adapter's low-rank factors are held in memory (they
are small); base tensors are read on demand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from expertkit.errors import CheckpointError, ConfigError

META_NAME = "expertkit.json"


@dataclass(frozen=True)
class ZooMember:
    """One model of the zoo: a full model folder or a LoRA adapter over a base folder."""

    name: str
    path: Path
    kind: Literal["model", "adapter"]
    base: Path | None = None  # adapters: the base model folder
    tasks: tuple[str, ...] = field(default_factory=tuple)

    @property
    def weights_base(self) -> Path:
        """The folder whose config/tokenizer describe this member (the base for adapters)."""
        return self.base if self.kind == "adapter" and self.base is not None else self.path


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _tasks_of(path: Path) -> tuple[str, ...]:
    try:
        meta = json.loads((path / META_NAME).read_text())
    except (OSError, ValueError):
        return ()
    task = meta.get("task") if isinstance(meta, dict) else None
    return (task,) if isinstance(task, str) else ()


def resolve_base(source: str | os.PathLike[str]) -> Path:
    """A base model folder from a bundled name or a local folder."""
    from expertkit.models.loader import resolve

    kind, folder = resolve(str(source))
    if folder is None:
        raise CheckpointError(
            f"base model '{source}' is not a local folder or a bundled model; pass base= with a local folder."
        )
    return folder


def _member(path: Path, base: str | os.PathLike[str] | None) -> ZooMember:
    if _is_adapter(path):
        if base is None:
            cfg = json.loads((path / "adapter_config.json").read_text())
            base = cfg.get("base_model_name_or_path")
            if not base:
                raise ConfigError(
                    f"adapter {path} does not name its base model (base_model_name_or_path is empty); "
                    "pass the base explicitly (--base / base=)."
                )
        return ZooMember(path.name, path, "adapter", resolve_base(base), _tasks_of(path))
    return ZooMember(path.name, path, "model", None, _tasks_of(path))


def discover_zoo(
    paths: Sequence[str | os.PathLike[str]], *, base: str | os.PathLike[str] | None = None
) -> list[ZooMember]:
    """The zoo members found at ``paths`` (see the module docstring); names are made unique.

    Raises :class:`CheckpointError` for a path that is neither a model, an adapter nor a folder
    holding some, and :class:`ConfigError` when fewer than two members are found.
    """
    found: list[ZooMember] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_dir():
            hint = (" The quickstart's experts are written by `make run` (the quickstart run); run it first."
                    if "quickstart" in path.parts and not path.exists() else "")
            raise CheckpointError(f"zoo path not found or not a folder: {path}.{hint}")
        if _is_adapter(path) or _is_model(path):
            found.append(_member(path, base))
            continue
        children = [p for p in sorted(path.iterdir()) if p.is_dir()]
        if (path / "experts").is_dir():
            children += [p for p in sorted((path / "experts").iterdir()) if p.is_dir()]
        inner = [c for c in children if _is_adapter(c) or _is_model(c)]
        if not inner:
            raise CheckpointError(
                f"{path} holds no model (config.json + safetensors) and no LoRA adapter "
                "(adapter_config.json), neither directly nor one level down."
            )
        found += [_member(c, base) for c in inner]
    names: dict[str, int] = {}
    unique = []
    for m in found:
        name = m.name
        if name in names:
            name = f"{m.path.parent.name}-{m.name}"
        while name in names:
            name += "'"
        names[name] = 1
        unique.append(ZooMember(name, m.path, m.kind, m.base, m.tasks))
    if len(unique) < 2:
        raise ConfigError(f"a zoo needs at least two models; found {len(unique)} under {', '.join(map(str, paths))}.")
    return unique


class MemberWeights:
    """Read a zoo member's full weights tensor by tensor (adapters applied on the fly).

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, member: ZooMember) -> None:
        from expertkit.weights import Checkpoint, LoraAdapter

        self.member = member
        self.ckpt = Checkpoint(member.weights_base)
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bias: dict[str, torch.Tensor] = {}
        self._repl: dict[str, torch.Tensor] = {}
        if member.kind == "adapter":
            try:
                with LoraAdapter.open(member.path) as adapter:
                    adapter.align_to({i.name: i.shape for i in self.ckpt.infos()})
                    self._factors = {n: (a, b) for n, a, b in adapter.factors()}
                    self._bias = dict(adapter.bias_deltas())
                    self._repl = dict(adapter.replacements())
            except BaseException:
                self.ckpt.close()
                raise
            missing = [n for n in [*self._factors, *self._bias, *self._repl] if n not in self.ckpt]
            if missing:
                self.ckpt.close()
                raise CheckpointError(
                    f"adapter {member.path} adapts tensors its base {member.base} does not have "
                    f"({', '.join(missing[:3])}); it was trained on another base."
                )

    @property
    def config(self) -> dict[str, Any]:
        """The model's ``config.json`` (the base's for adapters); empty when absent."""
        return self.ckpt.config or {}

    def names(self) -> list[str]:
        """Tensor names (the base's for adapters: an adapter changes values, not names)."""
        return self.ckpt.names()

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, without reading it."""
        return self.ckpt.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of one tensor, without reading it."""
        return self.ckpt.info(name).dtype

    def changed(self) -> set[str]:
        """For adapters: the tensors that differ from the base (adapted, biased or replaced)."""
        return set(self._factors) | set(self._bias) | set(self._repl)

    def read(self, name: str) -> torch.Tensor:
        """One full tensor of the member (``base + B @ A_scaled`` for adapted weights)."""
        t = self._repl[name].clone() if name in self._repl else self.ckpt.read(name)
        if name in self._factors or name in self._bias:
            from expertkit.weights import apply_delta

            if name in self._factors:
                a, b = self._factors[name]
                t = apply_delta(t, b @ a)  # (d0, r) @ (r, d1) -> (d0, d1)
            if name in self._bias:
                t = apply_delta(t, self._bias[name])
        return t

    def state_dict(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (all by default) in memory."""
        return {n: self.read(n) for n in (names if names is not None else self.names())}

    def close(self) -> None:
        """Close the underlying checkpoint."""
        self.ckpt.close()

    def __enter__(self) -> MemberWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
