"""Training checkpoints: one safetensors file, written atomically.

A checkpoint holds the trainable tensors, the optimizer state, the torch RNG
state and a JSON record (step, data position, losses, config). Everything lives
in one ``.safetensors`` file: tensors as tensors, the rest as JSON in the file's
metadata, so no pickle is ever written or read and a single ``os.replace`` makes
the new checkpoint appear whole or not at all.

Nested states (an optimizer's ``state_dict``) are stored as a JSON *skeleton*
whose tensors are replaced by ``{"__tensor__": key}``; dicts become
``{"__dict__": [[key, value], ...]}`` so integer keys survive, and tuples
``{"__tuple__": [...]}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expertkit.errors import CheckpointError
from expertkit.fileio import fsync_path, new_folders, umask, writing

META_KEY = "expertkit.train_state"
FORMAT = "expertkit-train-checkpoint-v1"


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Return a JSON-ready skeleton of ``obj``; its tensors are moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten_state(v, prefix, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, prefix, tensors) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, prefix, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a training checkpoint; use tensors and numbers.")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(
    path: Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    rng_state: torch.Tensor,
    record: dict[str, Any],
) -> None:
    """Write a checkpoint file atomically (temporary file, fsync, rename)."""
    tensors = {f"param.{k}": v.detach().to("cpu").clone().contiguous() for k, v in trainable.items()}
    optim_tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(optimizer_state, "optim", optim_tensors)
    tensors.update(optim_tensors)
    tensors["rng.torch"] = rng_state.clone().contiguous()
    meta = {"format": FORMAT, "record": record, "optimizer": skeleton, "params": sorted(trainable)}
    with new_folders(path.parent), writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_path(path.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor, dict[str, Any]]:
    """Read a checkpoint: ``(trainable, optimizer_state, rng_state, record)``."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})[META_KEY])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iteration
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"training checkpoint {path} is unreadable ({exc}); delete it or pass resume=False."
        ) from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an expertkit training checkpoint ({meta.get('format')!r}).")
    trainable = {name: tensors[f"param.{name}"] for name in meta["params"]}
    optimizer_state = unflatten_state(meta["optimizer"], tensors)
    return trainable, optimizer_state, tensors["rng.torch"], meta["record"]
