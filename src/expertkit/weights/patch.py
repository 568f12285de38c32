"""Patches: named weight deltas plus the metadata needed to apply them safely.

A :class:`Patch` holds three kinds of tensors, each keyed by a base tensor name:

* ``deltas``: dense deltas (``W' = W + scale * delta``);
* ``factors``: low-rank deltas as ``(A, B)`` with ``delta = B @ A`` in the base
  tensor's layout (``B``: ``(d0, r)``, ``A``: ``(r, d1)``). LoRA patches store
  factors, not dense deltas: they are ``r * (d0 + d1)`` numbers instead of
  ``d0 * d1``, and a later step can apply them as adapters again. LoRA's
  ``alpha / r`` is already folded into ``A``;
* ``replacements``: full tensors that take the place of the base tensor
  (LoRA ``modules_to_save``, trained biases); ``scale`` does not apply to them.
  A name may have both a replacement and a delta (PEFT saves the embedding it
  adapts): the delta is added to the replacement.

Metadata: ``kind`` (``"lora"``, ``"dense"``, ``"task_vector"``),
``base_fingerprint`` (see :mod:`expertkit.weights.fingerprint`; None when
unknown), ``target_modules``, ``scale`` (a multiplier applied to deltas and
factors when the patch is applied, 1.0 by default), ``source`` (free text),
``created_at`` (ISO 8601, UTC) and ``extra`` (JSON-safe dict). Optionally ``sketch``: for some
base tensor names, the base's values at a few seeded coordinates (see
:mod:`expertkit.port.sketch`), so that how far another base has moved can be estimated later
without the original base at hand.

On disk a patch is a folder with ``patch.safetensors`` (tensor names
``delta/<name>``, ``lora_A/<name>``, ``lora_B/<name>``, ``replace/<name>``) and
``patch.json`` (metadata, tensor listing, sha256 of the safetensors file). It
is written to a temporary sibling folder, fsynced and renamed into place, so a
failed save leaves no folder behind. Patches are held in memory.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from expertkit.errors import CheckpointError, ConfigError, IncompatibleModelsError
from expertkit.fileio import fsync_path, sha256_file
from expertkit.weights.deltas import ModelSource, TensorSource, apply_delta, task_vector
from expertkit.weights.fingerprint import fingerprint
from expertkit.weights.lora import LoraAdapter
from expertkit.weights.reader import Checkpoint

FORMAT = "expertkit-patch"
VERSION = 1
KINDS = ("lora", "dense", "task_vector")
TENSORS_FILE = "patch.safetensors"
META_FILE = "patch.json"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")




@dataclass(eq=False)
class Patch:
    """Named deltas (dense or low-rank) and replacements, with their metadata."""

    kind: str
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (A, B)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    base_fingerprint: str | None = None
    target_modules: list[str] = field(default_factory=list)
    scale: float = 1.0
    source: str = ""
    created_at: str = field(default_factory=_now)
    extra: dict[str, Any] = field(default_factory=dict)
    sketch: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"patch kind '{self.kind}' is not one of {', '.join(KINDS)}.")
        for name, (a, b) in self.factors.items():
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise IncompatibleModelsError(
                    f"patch factors for '{name}' have shapes A {list(a.shape)}, B {list(b.shape)}; "
                    "expected A (r, d1) and B (d0, r) so that delta = B @ A."
                )
        clash = sorted(set(self.deltas) & set(self.factors))
        if clash:
            raise ConfigError(f"tensors {clash[:5]} appear both as factors and as dense deltas; keep one.")

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_lora(
        cls,
        adapter_path: str | os.PathLike[str],
        base: ModelSource | None = None,
        *,
        allow_pickle: bool = False,
    ) -> Patch:
        """Make a ``"lora"`` patch from a PEFT LoRA adapter folder.

        The factors are stored low-rank (see the module docstring). With
        ``base``, each module's layout is settled from the base shapes (see
        :meth:`LoraAdapter.align_to`), every patched name is checked against
        it (name and shape) and the patch records ``fingerprint(base)``;
        without it, the fingerprint recorded in the adapter's metadata is
        used, else None.
        """
        src = TensorSource(base) if base is not None else None
        try:
            return cls._from_lora(adapter_path, src, allow_pickle)
        finally:
            if src is not None:
                src.close()

    @classmethod
    def _from_lora(cls, adapter_path: str | os.PathLike[str], src: TensorSource | None, allow_pickle: bool) -> Patch:
        with LoraAdapter.open(adapter_path, allow_pickle=allow_pickle) as adapter:
            if src is not None:
                adapter.align_to({n: src.shape(n) for n in src.names()})
            factors = {n: (a, b) for n, a, b in adapter.factors()}
            deltas = dict(adapter.bias_deltas())  # lora_B biases: not low-rank
            replacements = dict(adapter.replacements())
            patch = cls(
                kind="lora",
                deltas=deltas,
                factors=factors,
                replacements=replacements,
                base_fingerprint=adapter.base_fingerprint,
                target_modules=adapter.target_modules,
                source=f"PEFT LoRA adapter {Path(adapter_path)}"
                + (f" for {adapter.base_model_name}" if adapter.base_model_name else ""),
                extra={
                    "lora": {m.weight_name: {"r": m.r, "alpha": m.alpha, "scale": m.scale} for m in adapter.modules}
                },
            )
        if src is not None:
            patch.check_against(src)
            patch.base_fingerprint = fingerprint(src.underlying)
        return patch

    @classmethod
    def from_task_vector(
        cls, finetuned: ModelSource, base: ModelSource, *, names: list[str] | None = None, keep_zero: bool = False
    ) -> Patch:
        """Make a ``"task_vector"`` patch holding ``finetuned - base``.

        Deltas that are exactly zero (frozen tensors) are dropped unless
        ``keep_zero``; a name absent from a patch means "unchanged".
        ``target_modules`` lists the modules (tensor names minus the last
        part) with a non-zero delta.
        """
        deltas = {n: d for n, d in task_vector(finetuned, base, names=names) if keep_zero or bool(d.any())}
        modules = sorted({n.rsplit(".", 1)[0] for n, d in deltas.items() if bool(d.any())})
        label = getattr(finetuned, "path", finetuned if isinstance(finetuned, (str, os.PathLike)) else "state dict")
        return cls(
            kind="task_vector",
            deltas=deltas,
            base_fingerprint=fingerprint(base),
            target_modules=modules,
            source=f"task vector of {label}",
        )

    # ----------------------------------------------------------------- reading
    def names(self) -> list[str]:
        """Every base tensor name the patch changes, sorted."""
        return sorted(set(self.deltas) | set(self.factors) | set(self.replacements))

    def dense_deltas(self, *, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, dense delta)`` for deltas and factors (unscaled by ``self.scale``)."""
        for name in sorted(set(self.deltas) | set(self.factors)):
            if name in self.factors:
                a, b = self.factors[name]
                yield name, b.to(dtype) @ a.to(dtype)  # (d0, r) @ (r, d1) -> (d0, d1)
            else:
                yield name, self.deltas[name].to(dtype)

    def apply_tensor(self, name: str, tensor: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
        """Return base tensor ``name`` with the patch applied (unchanged when the patch skips it)."""
        s = self.scale if scale is None else scale
        out = self.replacements[name].to(tensor.dtype) if name in self.replacements else tensor
        if name in self.factors:
            a, b = self.factors[name]
            out = apply_delta(out, b.float() @ a.float(), s)  # (d0, r) @ (r, d1) -> (d0, d1)
        elif name in self.deltas:
            out = apply_delta(out, self.deltas[name], s)
        return out

    def apply(
        self, base: ModelSource, *, scale: float | None = None, check_fingerprint: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream every tensor of ``base`` with the patch applied, one at a time.

        Checks now (before returning) that every patched name exists in
        ``base`` with the right shape and, when ``check_fingerprint`` and the
        patch records one, that ``base`` has the recorded fingerprint. Pass
        ``check_fingerprint=False`` to apply a patch to another base on
        purpose (e.g. a PortLLM port to an evolved base).
        """
        src = TensorSource(base)
        try:
            self.check_against(src)
            if check_fingerprint and self.base_fingerprint is not None:
                got = fingerprint(src.underlying)
                if got != self.base_fingerprint:
                    raise IncompatibleModelsError(
                        f"the patch was made on a base with fingerprint {self.base_fingerprint}, but "
                        f"{src.label} has fingerprint {got}. Use the base it was made on, or pass "
                        "check_fingerprint=False to apply it to a different base deliberately."
                    )
        except BaseException:
            src.close()
            raise
        return self._apply_stream(src, scale)

    def _apply_stream(self, src: TensorSource, scale: float | None) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            for name in src.names():
                yield name, self.apply_tensor(name, src.read(name), scale=scale)
        finally:
            src.close()

    def check_against(self, base: TensorSource) -> None:
        """Raise :class:`IncompatibleModelsError` unless every patched tensor fits ``base``."""
        have = set(base.names())
        missing = [n for n in self.names() if n not in have]
        if missing:
            raise IncompatibleModelsError(
                f"{len(missing)} patched tensors are not in {base.label}: {', '.join(missing[:5])}. "
                "The patch was made for a model with different tensor names; check the base."
            )
        wrong = [
            f"{n} {list(s)} vs {list(base.shape(n))}" for n, s in self._shapes().items() if s != base.shape(n)
        ]
        if wrong:
            raise IncompatibleModelsError(
                f"{len(wrong)} patched tensors differ in shape (patch vs base): {', '.join(wrong[:5])}. "
                "The patch was made for a different model size; check the base."
            )

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {n: tuple(t.shape) for n, t in self.deltas.items()}
        shapes.update({n: tuple(t.shape) for n, t in self.replacements.items()})
        shapes.update({n: (b.shape[0], a.shape[1]) for n, (a, b) in self.factors.items()})
        return shapes

    # -------------------------------------------------------------- save / load
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {f"delta/{n}": t for n, t in self.deltas.items()}
        out.update({f"replace/{n}": t for n, t in self.replacements.items()})
        for n, (a, b) in self.factors.items():
            out[f"lora_A/{n}"], out[f"lora_B/{n}"] = a, b
        out.update({f"sketch/{n}": t for n, t in self.sketch.items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "base_fingerprint": self.base_fingerprint,
            "target_modules": list(self.target_modules),
            "scale": self.scale,
            "source": self.source,
            "created_at": self.created_at,
            "extra": self.extra,
            "tensors": {
                "deltas": sorted(self.deltas),
                "factors": sorted(self.factors),
                "replacements": sorted(self.replacements),
                "sketch": sorted(self.sketch),
            },
        }

    def save(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the patch to ``folder`` atomically; return the folder.

        Refuses an existing folder unless ``overwrite``. On any failure the
        temporary folder is removed and ``folder`` is left as it was.
        """
        dest = Path(folder)
        if dest.exists() and not overwrite:
            raise CheckpointError(f"{dest} already exists. Choose another folder or pass overwrite=True.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            meta = self._meta()
            save_file(self._tensors(), str(tmp / TENSORS_FILE), metadata={"format": "pt", "kind": self.kind})
            fsync_path(tmp / TENSORS_FILE)
            meta["sha256"] = sha256_file(tmp / TENSORS_FILE)
            with open(tmp / META_FILE, "w") as fh:
                json.dump(meta, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            if dest.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.replace(dest, trash / dest.name)
                os.replace(tmp, dest)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Patch:
        """Load a patch saved by :meth:`save`, validating it.

        Raises :class:`CheckpointError` when the folder or a file is missing,
        when ``patch.json`` is invalid, or when ``patch.safetensors`` does not
        match its checksum or listing.
        """
        path = Path(folder)
        if not path.is_dir():
            raise CheckpointError(f"patch folder not found: {path}. Check the path.")
        for name in (META_FILE, TENSORS_FILE):
            if not (path / name).is_file():
                raise CheckpointError(f"{path} is not a complete patch: {name} is missing. Recreate the patch.")
        try:
            meta = json.loads((path / META_FILE).read_text())
            listing = meta["tensors"]
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path / META_FILE} is not an expertkit patch (format={meta.get('format')!r}).")
            if meta.get("version") != VERSION:
                raise CheckpointError(
                    f"{path / META_FILE}: patch format version {meta.get('version')} is not supported "
                    f"(this expertkit reads version {VERSION}); upgrade expertkit."
                )
            expected = _expected_names(listing)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path / META_FILE}: corrupt patch metadata ({exc}). Recreate the patch.") from exc
        if meta.get("sha256") != sha256_file(path / TENSORS_FILE):
            raise CheckpointError(
                f"{path / TENSORS_FILE} does not match the checksum in {META_FILE}; the file is corrupt "
                "or was changed. Recreate the patch."
            )
        with Checkpoint(path / TENSORS_FILE) as ckpt:
            stored = dict(ckpt.iter_tensors())
        if set(stored) != expected:
            diff = sorted(set(stored) ^ expected)
            raise CheckpointError(f"{path}: {TENSORS_FILE} and {META_FILE} disagree on tensors {diff[:5]}.")
        return cls(
            kind=meta["kind"],
            deltas={n: stored[f"delta/{n}"] for n in listing["deltas"]},
            factors={n: (stored[f"lora_A/{n}"], stored[f"lora_B/{n}"]) for n in listing["factors"]},
            replacements={n: stored[f"replace/{n}"] for n in listing["replacements"]},
            base_fingerprint=meta.get("base_fingerprint"),
            target_modules=list(meta.get("target_modules") or []),
            scale=float(meta.get("scale", 1.0)),
            source=str(meta.get("source", "")),
            created_at=str(meta.get("created_at", "")),
            extra=dict(meta.get("extra") or {}),
            sketch={n: stored[f"sketch/{n}"] for n in listing.get("sketch", [])},
        )


def _expected_names(listing: dict[str, Iterable[str]]) -> set[str]:
    names = {f"delta/{n}" for n in listing["deltas"]}
    names |= {f"replace/{n}" for n in listing["replacements"]}
    names |= {f"sketch/{n}" for n in listing.get("sketch", [])}
    for n in listing["factors"]:
        names |= {f"lora_A/{n}", f"lora_B/{n}"}
    return names
