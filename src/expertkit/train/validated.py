"""A LoRA training run whose checkpoints are chosen on validation, resumable, with an equal-wall point.

:func:`train_run` drives :func:`expertkit.train.train_lora` into a run folder and, at each of its
checkpoints, scores the LoRA weights on validation (outside the training time) and keeps, beside
``train_lora``'s own ``adapter/`` folder:

* ``validation.json``: every checkpoint's step, training seconds and validation scores (step 0: the LoRA
  start, which equals the base model) — :func:`history`;
* ``best.safetensors``: the point best on validation (:func:`rank`) — :func:`best_point`;
* ``wall.safetensors``: the point best on validation among those trained within a limit of training
  seconds (equal wall time), optionally timed on another machine (:func:`wall_scale`) — :func:`wall_point`;
* ``snapshots/step-N.safetensors``: the LoRA weights where a run was stopped early (a sweep point) —
  :func:`snapshots`.

Every file is written atomically, so a run killed anywhere resumes from its last checkpoint with the same
choices. For early stopping alone, ``train_lora``'s ``select_n`` (:mod:`expertkit.train.selection`) does the
same inside one run folder; this module adds what the ZO-Bench protocol needs besides: the validation
history and the points as files of their own, a caller-given scorer (zo_bench scores on a second copy of
the base model and breaks ties on the right label's log-probability) and the equal-wall point. Written for ``experiments/zo_bench.py`` (its state format: changing a file name or a rule here
orphans its committed run state).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from expertkit.train.selection import save_point

__all__ = ["best_point", "history", "rank", "snapshots", "train_run", "wall_point", "wall_scale"]


class _Stop(Exception):
    """Raised by the snapshot callback to end a sweep run at its scoring step (its checkpoint is saved)."""


def snapshots(run: Path) -> list[tuple[int, float, Path]]:
    """``(step, training seconds, file)`` of every snapshot of ``run``, by step."""
    from safetensors import safe_open

    out = []
    for p in sorted((run / "snapshots").glob("step-*.safetensors")):
        with safe_open(str(p), framework="pt") as fh:
            out.append((int(p.stem.split("-")[1]), float((fh.metadata() or {})["seconds"]), p))
    return out


def _wall_file(run: Path) -> Path:
    return run / "wall.safetensors"


def _history_file(run: Path) -> Path:
    return run / "validation.json"


def history(run: Path) -> list[dict]:
    """Every checkpoint of ``run`` scored on validation so far: ``{"step", "seconds", "validation"}``, by step
    (step 0: the LoRA start)."""
    path = _history_file(run)
    return json.loads(path.read_text()) if path.is_file() else []


def rank(entry: dict) -> tuple:
    """How a checkpoint is chosen on validation: accuracy, then the mean log-probability of the right
    label, then the earlier step."""
    gold = entry["validation"]["gold_lp"]
    return (entry["validation"]["accuracy"], sum(gold) / len(gold) if gold else 0.0, -entry["step"])


def _best_file(run: Path) -> Path:
    return run / "best.safetensors"


def _meta(path: Path) -> dict:
    """The metadata of a point file (step, seconds, limit) without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata() or {}


def _point(path: Path) -> tuple[int, float, dict | None]:
    from safetensors.torch import load_file

    meta = _meta(path)
    step = int(meta["step"])
    return step, float(meta["seconds"]), load_file(str(path)) if step else None


def best_point(run: Path) -> tuple[int, float, dict | None]:
    """``(step, training seconds, tensors)`` of the checkpoint of ``run`` best on validation (step 0 and no
    tensors: the LoRA start)."""
    return _point(_best_file(run))


def wall_point(run: Path) -> tuple[int, float, float, dict | None]:
    """``(step, training seconds, limit, tensors)`` of the checkpoint of ``run`` trained within the equal-wall
    limit that is best on validation (without validation: the last one; step 0 and no tensors: the LoRA
    start)."""
    from expertkit.errors import ConfigError

    path = _wall_file(run)
    if not path.is_file():
        raise ConfigError(f"{run} was trained without the equal-wall limit (no {path.name}); delete the folder "
                          "and run again.")
    step, seconds, tensors = _point(path)
    return step, seconds, float(_meta(path)["limit"]), tensors


def wall_scale(reference: list | None, past: list[dict], step: int = -1, seconds: float = 0.0) -> float:
    """Seconds of this machine -> seconds of the machine that trained ``reference = [step S, seconds]`` (the
    method's sweep point: the same first S steps of the same configuration, so the ratio of the two times is
    the ratio of the two machines' speeds on this very work). 1.0 until this run has timed step S itself, and
    exactly 1.0 when the run resumed from the sweep point (its step S is the sweep's, seconds included)."""
    if not reference:
        return 1.0
    s_step, s_seconds = reference
    own = seconds if step == s_step else next((e["seconds"] for e in past if e["step"] == s_step), None)
    return float(s_seconds) / own if own else 1.0


def train_run(loaded: Any, task: Any, cfg: dict, run: Path, stop: int | None = None,
              limit: float | None = None, validate: Any = None, reference: list | None = None) -> Any:
    """Train (or resume) ``cfg`` into ``run``; stop after step ``stop`` when given (its checkpoint and a
    snapshot of its LoRA weights written). ``validate`` (LoRA tensors, None for the LoRA start -> scores):
    every checkpoint, and the start, is scored on validation as it is written (``history``; its time is not
    training time), the best kept in ``run/best.safetensors``. With ``limit`` (seconds),
    ``run/wall.safetensors`` holds the checkpoint trained within it that is best on validation (without
    ``validate``: the last one); ``reference``: the seconds are scaled to the machine that set ``limit``
    (``wall_scale``). The TrainResult, or None when stopped early."""
    import torch

    from expertkit.errors import ConfigError
    from expertkit.fileio import write_atomic
    from expertkit.train import train_lora
    from expertkit.train.lora import CHECKPOINT
    from expertkit.train.state import load_checkpoint

    if reference and validate is None:  # the run's own time of the sweep step is read from its history
        raise ValueError("train_run: reference needs validate")
    adapter = run / "adapter"  # train_lora owns this folder (the finished adapter replaces it whole)
    ckpt = adapter / CHECKPOINT
    finished = (adapter / "adapter_config.json").is_file()

    def keep(step: int, seconds: float) -> float | None:  # after the checkpoint of ``step``: the files it feeds
        """Write what the checkpoint of ``step`` feeds; its validation accuracy (None without ``validate``)."""
        target = run / "snapshots" / f"step-{step:06d}.safetensors"
        snap = stop is not None and step == stop and not target.is_file()
        past = history(run)
        wall = limit is not None and seconds * wall_scale(reference, past, step, seconds) <= limit
        check = validate is not None and all(e["step"] != step for e in past)
        trainable = load_checkpoint(ckpt)[0] if step and (snap or wall or check) else {}
        if snap:
            save_point(target, trainable, {"seconds": repr(seconds)})
        meta = {"step": str(step), "seconds": repr(seconds)}
        if check:
            with torch.random.fork_rng(devices=[]):  # training's random stream is not touched
                entry = {"step": step, "seconds": seconds, "validation": validate(trainable or None)}
            past = sorted([*past, entry], key=lambda e: e["step"])
            run.mkdir(parents=True, exist_ok=True)
            write_atomic(_history_file(run), json.dumps(past).encode())
            if max(past, key=rank) is entry:
                save_point(_best_file(run), trainable, meta)
        if wall and validate is not None and _wall_file(run).is_file():  # replace only a worse point
            kept = int(_meta(_wall_file(run))["step"])  # the step only: its tensors are not needed
            scored = {e["step"]: e for e in past}
            wall = step not in scored or kept not in scored or rank(scored[step]) > rank(scored[kept])
        if wall:
            save_point(_wall_file(run), trainable, {**meta, "limit": repr(limit)})
        return next((e["validation"]["accuracy"] for e in past if e["step"] == step), None)

    if validate is not None and (ckpt.is_file() or finished) and not history(run):
        raise ConfigError(f"{run} was trained without validating its checkpoints (no {_history_file(run).name}); "
                          "delete the folder and run again.")
    if validate is not None and not ckpt.is_file() and not finished:
        keep(0, 0.0)  # the LoRA start is a candidate too
    if limit is not None:
        if _wall_file(run).is_file():
            kept_limit = float(_meta(_wall_file(run))["limit"])
            if kept_limit != limit:
                raise ConfigError(f"{run} kept its equal-wall point for another limit ({kept_limit:g} s, not "
                                  f"{limit:g} s): the first full run changed. Delete the folder and run again.")
        elif ckpt.is_file() or finished:
            wall_point(run)  # trained before the limit was known: its clear error
        else:
            keep(0, 0.0)  # the LoRA start, until a checkpoint within the limit replaces it
    if ckpt.is_file() and not finished:
        record = load_checkpoint(ckpt)[3]  # killed between a checkpoint and its snapshot: write it now
        keep(int(record["step"]), float(record["seconds"]))

    window: list[float] = []  # training losses since the last checkpoint (or the resume)

    def callback(info: Any) -> None:
        window.append(info.loss)
        if info.step % cfg["save_every"] == 0 and info.step < cfg["steps"]:  # a checkpoint was just written
            val = keep(info.step, info.seconds)
            val = "" if val is None else f", validation {val:.3f}"
            print(f"  {run.parent.name} {run.name} step {info.step}: mean training loss of steps "
                  f"{info.step - len(window) + 1}-{info.step} {sum(window) / len(window):.4g}{val}, "
                  f"{info.seconds:.0f} s", flush=True)  # the live view of a run: a divergence shows here first
            window.clear()
        if stop is not None and stop < cfg["steps"] and info.step >= stop:
            raise _Stop  # a stop at the last step is the whole run: train_lora writes its adapter

    if stop is not None and stop < cfg["steps"]:
        if any(s == stop for s, _, _ in snapshots(run)) or finished:
            return None  # this point was reached before
    try:
        return train_lora(loaded, task, adapter, callbacks=[callback], **cfg)
    except _Stop:
        return None
