"""PortLLM: make a patch on an old base, carry it to the evolved base without training.

:func:`extract_patch` turns a PEFT LoRA adapter, or a fine-tuned folder minus its base, into a
:class:`~expertkit.weights.patch.Patch` (low-rank factors are kept low rank) and stores a sketch
of the old base (:mod:`expertkit.port.sketch`) so drift can be measured later.

:func:`port` applies it to a new base: ``theta_new + scale * delta`` streamed tensor by tensor
into a sharded model folder (memory: about two tensors), or, with ``as_adapter``, a PEFT
adapter for the new base (:mod:`expertkit.port.adapter`). Before any writing it checks names
and shapes, compares fingerprints and measures the drift (:mod:`expertkit.port.diagnose`):
porting onto the very base the patch was made on is reported as such, onto an unrelated model
is an error unless ``force``. The output folder gets ``port.json`` (what was done, the
diagnosis, SVD residuals) and appears only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import CheckpointError, ConfigError, IncompatibleModelsError
from expertkit.fileio import new_folders, write_atomic, writing
from expertkit.port.diagnose import PortDiagnosis, diagnose
from expertkit.port.sketch import sketch_source
from expertkit.weights.deltas import TensorSource
from expertkit.weights.patch import Patch

PORT_META = "port.json"


@dataclass
class PortResult:
    """What :func:`port` wrote."""

    path: Path
    kind: str  # "model" or "adapter"
    scale: float
    diagnosis: PortDiagnosis
    adapter: dict[str, Any] | None = None  # rank, residuals, skipped (adapters only)


def _folder(source: str | os.PathLike[str]) -> Path:
    """A model folder for a bundled name or a path."""
    from expertkit.models.loader import resolve

    kind, folder = resolve(str(source))
    if folder is None:
        raise CheckpointError(f"'{source}' is not a local model; pass a model folder or a bundled name.")
    return folder


def _not_found(path: Path, what: str) -> CheckpointError:
    """A missing input; the quickstart's experts get a pointer to what makes them."""
    hint = ("the quickstart's experts are written by `make run`, i.e. `expertkit run examples/quickstart.yaml`: "
            "run it first" if "quickstart" in path.parts else "check the path")
    return CheckpointError(f"{what} not found: {path} ({hint}).")


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """True for a PEFT adapter folder."""
    return (Path(path) / "adapter_config.json").is_file()


def _adapter_base(path: Path) -> Path | None:
    """The adapter's recorded base when it is a bundled name or an existing folder, else None."""
    name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not name:
        return None
    try:
        return _folder(name)
    except Exception:  # noqa: BLE001 - a hub id or a moved folder: treated as unknown
        return None


def extract_patch(
    source: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, *, sketch: bool = True
) -> Patch:
    """A patch from a PEFT adapter folder (``base`` optional) or a fine-tuned folder (``base`` required).

    With a base (given, or the adapter's recorded base when it resolves locally) the patch records
    the base's fingerprint and, when ``sketch``, a sketch of each patched tensor.
    """
    path = Path(source)
    if not path.exists():
        raise _not_found(path, "adapter or model folder")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass a PEFT adapter folder or a fine-tuned model folder.")
    base_dir = _folder(base) if base is not None else (_adapter_base(path) if is_adapter(path) else None)
    if is_adapter(path):
        patch = Patch.from_lora(path, base_dir) if base_dir is not None else Patch.from_lora(path)
    else:
        if base_dir is None:
            raise ConfigError(f"{path} is a model folder, not an adapter: pass --base, the model it was fine-tuned from.")
        patch = Patch.from_task_vector(path, base_dir)
    if base_dir is not None:
        src = TensorSource(base_dir)
        try:
            _replacements_to_deltas(patch, src)
            if sketch:
                patch.sketch = sketch_source(src, patch.names())
        finally:
            src.close()
    return patch


def _replacements_to_deltas(patch: Patch, base: TensorSource) -> None:
    """Turn full-tensor replacements into deltas against ``base``, so that they port.

    PEFT saves whole embedding layers next to embedding LoRA factors (``save_embedding_layers``)
    and whole ``modules_to_save``; applied to a *new* base as they are, they would silently put
    the old base's values back. A replacement equal to the base tensor is dropped; otherwise it
    becomes the dense delta ``replacement - base`` (plus the tensor's low-rank delta, if any).
    """
    for name in list(patch.replacements):
        diff = patch.replacements.pop(name).float() - base.read(name).float()
        if not bool(diff.any()):
            continue
        if name in patch.factors:
            a, b = patch.factors.pop(name)
            diff = diff + b.float() @ a.float()  # (d0, r) @ (r, d1)
        patch.deltas[name] = diff + patch.deltas.pop(name, torch.zeros_like(diff))


def _load_patch(patch: Patch | str | os.PathLike[str]) -> Patch:
    if isinstance(patch, Patch):
        return patch
    if not Path(patch).exists():
        raise _not_found(Path(patch), "patch or adapter folder")
    return extract_patch(patch) if is_adapter(patch) else Patch.load(patch)


def _check(patch: Patch, new_dir: Path) -> None:
    src = TensorSource(new_dir)
    try:
        patch.check_against(src)
    finally:
        src.close()


def port(  # noqa: PLR0913 - keyword options of one command
    patch: Patch | str | os.PathLike[str],
    new_base: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    as_adapter: bool = False,
    rank: int = 16,
    old_base: str | os.PathLike[str] | None = None,
    force: bool = False,
    skip_non_matrix: bool = False,
    overwrite: bool = False,
) -> PortResult:
    """Apply ``scale`` x ``patch`` to ``new_base``; write a model folder or (``as_adapter``) a PEFT adapter.

    ``patch`` is a :class:`Patch`, a saved patch folder or a PEFT adapter folder. Raises
    :class:`IncompatibleModelsError` (nothing written) when names or shapes do not fit, or when
    the new base looks unrelated to the patch's base and ``force`` is not set.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder exists: {out}. Choose another path, or pass --overwrite (overwrite=True in Python).")
    patch = _load_patch(patch)
    new_dir = _folder(new_base)
    _check(patch, new_dir)
    diag = diagnose(patch, new_dir, old_base=_folder(old_base) if old_base is not None else None, scale=scale)
    if diag.relation == "unrelated" and not force:
        raise IncompatibleModelsError(
            f"refusing to port: {diag.message} Pass --force (force=True) to apply it anyway."
        )
    meta = {"format": "expertkit-port", "new_base": str(new_dir.resolve()), "patch_source": patch.source, "scale": scale,
            "patch_kind": patch.kind, "output": "adapter" if as_adapter else "model", "diagnosis": diag.to_dict()}
    with new_folders(out.parent), writing(out):
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.port-", dir=out.parent))
        info = None
        try:
            if as_adapter:
                from expertkit.port.adapter import write_adapter

                cfg_path = new_dir / "config.json"
                config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
                # PEFT's base_model_name_or_path: absolute, so that the adapter loads from any directory
                info = write_adapter(patch, stage / "out", base_name=str(new_dir.resolve()), base_config=config,
                                     scale=scale, rank=rank, skip_non_matrix=skip_non_matrix)
                meta["adapter"] = info
            else:
                _write_model(patch, new_dir, stage / "out", scale)
            write_atomic(stage / "out" / PORT_META, json.dumps(meta, indent=1))
            if out.exists():
                os.replace(out, stage / "old")
            os.replace(stage / "out", out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return PortResult(out, "adapter" if as_adapter else "model", scale, diag, info)


def _write_model(patch: Patch, new_dir: Path, out: Path, scale: float) -> None:
    """Stream ``new_dir`` + ``scale`` x ``patch`` into a sharded model folder at ``out``."""
    from expertkit.weights.writer import ShardedWriter

    src = TensorSource(new_dir)
    try:
        layout = [(n, src.shape(n), src.dtype(n)) for n in src.names()]
    finally:
        src.close()
    with ShardedWriter(out, template=new_dir, layout=layout, metadata={"expertkit": "ported"}) as writer:
        for name, tensor in patch.apply(new_dir, scale=scale, check_fingerprint=False):
            writer.add(name, tensor)
