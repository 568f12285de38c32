"""``compress_moe(config, out)``: calibrate, allocate, compress layer by layer, optionally distill.

1. **Calibrate** (the model in memory once): routing statistics of the calibration prompts through
   the routing subsystem (:func:`expertkit.moe.routing_stats`, cached), and REAP scores when the
   method needs them.
2. **Allocate** the experts each layer keeps (:func:`~expertkit.moe.compress.allocate.allocate`).
3. **Compress** streaming, one new expert in memory at a time (:func:`~expertkit.moe.compress.run.compress_checkpoint`).
4. **Distill** (``kd.steps > 0``): the compressed model learns from the original
   (:mod:`~expertkit.moe.compress.kd`); the folder written is then the recovered model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from expertkit.errors import ConfigError
from expertkit.moe.compress.config import CompressConfig
from expertkit.moe.compress.run import CompressResult, LayerStats, compress_checkpoint


def model_folder(source: str) -> Path:
    """The local folder of a model source (bundled name or folder); hub ids are refused."""
    from expertkit.models.loader import resolve

    _kind, folder = resolve(source)
    if folder is None:
        raise ConfigError(f"'{source}' is not a local model folder; MoE compression reads a folder.")
    return folder


def calibration_tasks(config: CompressConfig, folder: Path) -> list[str]:
    """The configured calibration tasks, else the tasks the MoE was built on (its moe_build.json)."""
    if config.calibration.tasks:
        return list(config.calibration.tasks)
    meta = folder / "moe_build.json"
    if meta.is_file():
        recipe = json.loads(meta.read_text()).get("recipe", {})
        tasks = [t for c in recipe.get("clusters", ()) for t in c.get("tasks", ())]
        if tasks:
            return tasks
    raise ConfigError(f"{folder} was not built by `expertkit moe build`; give calibration.tasks "
                      "(suite tasks whose prompts show how the MoE routes).")


def calibrate(config: CompressConfig, folder: Path, loaded: Any = None) -> tuple[Any, np.ndarray | None]:
    """``(RoutingStats, REAP scores or None)`` of the model over the calibration prompts."""
    from expertkit.models.loader import load_model
    from expertkit.moe.collect import routing_stats, task_prompts
    from expertkit.moe.compress import METHODS

    cal = config.calibration
    tasks = calibration_tasks(config, folder)
    loaded = loaded or load_model(folder)
    stats = routing_stats(loaded, tasks, n=cal.n, split=cal.split, seed=config.seed, batch_size=cal.batch_size,
                          sample_tokens=cal.sample_tokens)
    reap = None
    if "reap" in METHODS.get(config.method).needs:
        reap = cached_reap(loaded, task_prompts(tasks, cal.n, cal.split, config.seed), cal.batch_size)
    return stats, reap


def cached_reap(loaded: Any, prompts: dict[str, list[str]], batch_size: int) -> np.ndarray:
    """REAP scores, cached beside the routing statistics (same key: model, prompts, settings)."""
    from expertkit.models.bundled import cache_root
    from expertkit.moe.collect import stats_key
    from expertkit.moe.compress.reap import reap_scores
    from expertkit.weights.fingerprint import model_digest

    fp = model_digest(loaded.model)  # every byte, as the routing statistics beside it
    path = cache_root() / "moe-stats" / f"reap-{stats_key(fp, prompts, batch_size=batch_size)}.npy"
    if path.is_file():
        return np.load(path)
    scores = reap_scores(loaded.model, loaded.tokenizer, prompts, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    from expertkit.fileio import write_atomic
    import io

    buf = io.BytesIO()
    np.save(buf, scores)
    write_atomic(path, buf.getvalue())
    return scores


def keep_per_layer(config: CompressConfig, stats: Any) -> list[int]:
    """Experts each MoE layer keeps under ``config`` (the same for every method at equal settings)."""
    from expertkit.moe.compress.allocate import allocate

    n_layers = len(stats.layers)
    total = round(config.experts_per_layer * n_layers)
    return allocate(stats.counts, total, mode=config.allocation, min_experts=config.min_experts or stats.top_k)


def compress_moe(config: CompressConfig, out: str | os.PathLike[str], *, overwrite: bool = False,
                 stats: Any = None, reap: np.ndarray | None = None) -> CompressResult:
    """Compress the MoE ``config.model`` into ``out`` (see the module docstring).

    ``stats`` / ``reap``: precomputed calibration (e.g. shared by several methods of one experiment).
    """
    from expertkit.fileio import check_writable

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder exists: {out}. Choose another path or pass --overwrite.")
    check_writable(out)
    folder = model_folder(config.model)
    params = config.method_params()
    from expertkit.moe.compress.layers import MoeCheckpoint
    from expertkit.weights import Checkpoint

    with Checkpoint(folder) as ckpt:
        MoeCheckpoint(ckpt)  # a dense or unsupported model fails here, before any weight is loaded
    if stats is None:
        stats, reap = calibrate(config, folder)
    keep = keep_per_layer(config, stats)
    low = (config.lowrank.keep, config.lowrank.sparse_share) if config.lowrank.keep is not None else None
    extra = {"config": config.model_dump(mode="json"), "source": str(folder),
             "calibration": {"tasks": calibration_tasks(config, folder), "n": config.calibration.n,
                             "split": config.calibration.split, "routing": stats.summary()}}
    layer_stats = LayerStats.from_routing(stats, reap)
    if not config.kd.steps:
        return compress_checkpoint(folder, out, method=config.method, params=params, stats=layer_stats, keep=keep,
                                   lowrank=low, stock=config.stock, seed=config.seed, overwrite=overwrite, extra=extra)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.kd-", dir=out.parent))
    try:
        first = compress_checkpoint(folder, tmp / "compressed", method=config.method, params=params,
                                    stats=layer_stats, keep=keep, lowrank=low, stock=config.stock, seed=config.seed,
                                    extra=extra)
        path = recover(first.path, folder, out, config, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CompressResult(path, json.loads((path / "compress.json").read_text()))


def recover(compressed: str | os.PathLike[str], original: str | os.PathLike[str], out: str | os.PathLike[str],
            config: CompressConfig, *, overwrite: bool = False) -> Path:
    """Distill the compressed folder against the original MoE and write the result to ``out``."""
    from expertkit.models.loader import load_model
    from expertkit.moe.compress.kd import distill, write_recovered

    student, teacher = load_model(compressed), load_model(original)
    if student.tokenizer is None:
        raise ConfigError(f"{compressed} has no tokenizer; distillation needs one.")
    tasks = calibration_tasks(config, Path(original))
    record = distill(student.model, teacher.model, student.tokenizer, tasks, config.kd, seed=config.seed)
    del teacher
    return write_recovered(student.model, compressed, out, {"kd": record}, overwrite=overwrite)
