"""Train one LoRA expert on one task: seeded, resumable, written atomically.

``train_lora(base, task, out_dir, config)`` wraps the base model with PEFT LoRA,
trains on ``task``'s train split with the loss on the target tokens only, and
writes ``out_dir`` as a standard PEFT adapter folder (``adapter_config.json``,
``adapter_model.safetensors`` whose metadata records the base fingerprint) plus
``expertkit.json`` (base, task, config, losses, metrics, seconds).

* Seeded: LoRA init, dropout, the draw of training examples and their order all
  follow ``config.seed``; the same seed gives identical adapter weights. The
  caller's torch RNG state is left untouched.
* Resumable: every ``save_every`` steps the trainable tensors, optimizer state,
  RNG state and step go to ``out_dir/checkpoint/state.safetensors`` (atomic
  replace). With ``resume=True`` a run continues from there and ends with the
  same weights as an uninterrupted run; a finished adapter with the same config
  and base is reused without training.
* Atomic: the adapter is assembled in a temporary sibling folder and renamed into
  place, so an interrupted run never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertkit.config import validate
from expertkit.errors import CheckpointError, ConfigError
from expertkit.fileio import check_writable, staged_folder
from expertkit.progress import loss_bar
from expertkit.tasks.base import Task
from expertkit.train.config import LoraTrainConfig
from expertkit.train.data import batch_indices, encode_examples, make_loss_fn
from expertkit.train.optimizers import build_optimizer, optimizer_entry
from expertkit.train.schemes import output_files, save, wrap
from expertkit.train.selection import Selection
from expertkit.train.state import load_checkpoint, save_checkpoint

META_NAME = "expertkit.json"
CHECKPOINT = Path("checkpoint") / "state.safetensors"
FORMAT = "expertkit-lora-v1"
_OURS = {"adapter_config.json", "adapter_model.safetensors", META_NAME, "checkpoint", "README.md",
         "config.json", "model.safetensors", "generation_config.json"}  # the last three: scheme "full"


@dataclass(frozen=True)
class StepInfo:
    """Passed to callbacks after every step (and after any checkpoint of that step)."""

    step: int  # completed steps, 1-based
    loss: float
    lr: float
    seconds: float  # training time so far (callbacks' own time is not counted)


@dataclass
class TrainResult:
    """What a training run produced."""

    out_dir: Path
    task: str
    steps: int
    losses: list[float]
    seconds: float
    metrics: dict[str, Any] | None = None
    resumed_from: int | None = None  # step of the checkpoint a run continued from
    reused: bool = False  # a finished adapter with the same config was found; nothing was trained
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def final_loss(self) -> float:
        """Loss of the last step."""
        return self.losses[-1]

    @property
    def train_loss(self) -> float:
        """Mean loss over the last tenth of the steps (at least one)."""
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[-k:]) / k


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file; out_dir must be a folder for the adapter.")
    check_writable(out_dir)  # before training, not after: a parent that is a file, a read-only disk
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OURS)
        if foreign:
            raise CheckpointError(
                f"{out_dir} holds files that are not part of an expertkit adapter ({', '.join(foreign[:3])}); "
                "choose an empty or new folder: the finished adapter replaces the whole folder."
            )


def _base_name(loaded: Any) -> str:
    """expertkit's name of the base (``expertkit.json``): a bundled name, an absolute folder or a hub id."""
    from expertkit.models.bundled import BUNDLED

    return loaded.name if loaded.name in BUNDLED or loaded.path is None else str(loaded.path.resolve())


def peft_base_path(loaded: Any) -> str:
    """The base as PEFT's ``base_model_name_or_path`` must name it: the absolute folder the weights
    were loaded from (for a bundled model, its cached safetensors folder), so that
    ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` works from any directory; a hub id as is."""
    return str(loaded.path.resolve()) if loaded.path is not None else loaded.name


def config_scheme(meta: dict[str, Any]) -> str:
    """The fine-tuning scheme recorded in an output's metadata (``lora`` before schemes existed)."""
    return (meta.get("config") or {}).get("scheme", "lora")


def _identity(config: LoraTrainConfig, task: Task, base_fp: str, base_digest: str) -> dict[str, Any]:
    # base_fingerprint names the base in the adapter (cheap, sampled); base_digest reads every byte, so
    # a finished adapter is reused only on the very same base weights
    return {"task": task.name, "base_fingerprint": base_fp, "base_digest": base_digest,
            "config": config.training_fields()}


def _finished(out_dir: Path, ident: dict[str, Any]) -> dict[str, Any] | None:
    try:
        meta = json.loads((out_dir / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    same = meta.get("format") == FORMAT and all(meta.get(k) == v for k, v in ident.items())
    complete = all((out_dir / f).is_file() for f in output_files(config_scheme(meta)))
    return meta if same and complete else None


def _write_adapter(peft_model: Any, out_dir: Path, meta: dict[str, Any], base_path: str) -> None:
    """Write the adapter into a temporary sibling folder, then swap it in for ``out_dir``;
    ``base_path`` goes to PEFT's ``base_model_name_or_path``."""
    from safetensors.torch import load_file, save_file

    from expertkit.weights.fingerprint import FINGERPRINT_METADATA_KEY

    with staged_folder(out_dir) as tmp:
        scheme = config_scheme(meta)
        for cfg in getattr(peft_model, "peft_config", {}).values():
            cfg.base_model_name_or_path = base_path
        save(peft_model, tmp, scheme)
        weights = tmp / ("model.safetensors" if scheme == "full" else "adapter_model.safetensors")
        tensors = load_file(weights)
        save_file(tensors, weights, metadata={"format": "pt", FINGERPRINT_METADATA_KEY: meta["base_fingerprint"]})
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1))


def _evaluate(model: Any, tokenizer: Any, task: Task, config: LoraTrainConfig, **kw: Any) -> dict[str, Any]:
    from expertkit.tasks.evaluate import evaluate

    res = evaluate(model, tokenizer, task, split=config.eval_split, n=config.eval_n, **kw)
    return {
        "split": res.split, "n": res.n, "asked_n": config.eval_n, "accuracy": res.accuracy,
        "ci": [res.ci_low, res.ci_high],
    }


def _resolve(config: LoraTrainConfig | None, overrides: dict[str, Any]) -> LoraTrainConfig:
    base = config.model_dump() if config is not None else {}
    return validate(LoraTrainConfig, {**base, **overrides}, source="LoRA training config")


def train_lora(
    base: Any,
    task: Task | str,
    out_dir: str | os.PathLike[str],
    config: LoraTrainConfig | None = None,
    *,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    **overrides: Any,
) -> TrainResult:
    """Train a LoRA expert for ``task`` on ``base`` and write it to ``out_dir``.

    Args:
        base: a :class:`~expertkit.models.LoadedModel` (its model is wrapped in place and
            restored afterwards) or any source :func:`~expertkit.models.load_model` accepts.
        task: a :class:`Task` or a registered task name.
        out_dir: the adapter folder to write (replaced as a whole when training ends).
        config: a :class:`LoraTrainConfig`; ``overrides`` (e.g. ``steps=40, lr=1e-3``) replace
            its fields, and are validated the same way (a typo names the nearest field).
        callbacks: called with a :class:`StepInfo` after every step; an exception raised there
            (e.g. ``KeyboardInterrupt``) stops training, and a later call resumes from the
            last checkpoint. The time spent in callbacks is not counted in ``seconds``.
    """
    from expertkit.models.loader import LoadedModel, load_model
    from expertkit.weights.fingerprint import fingerprint, model_digest

    config = _resolve(config, overrides)
    if isinstance(task, str):
        from expertkit.tasks.base import get_task

        task = get_task(task)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    optimizer_entry(config.optimizer)  # an unknown name fails before any work
    loaded = base if isinstance(base, LoadedModel) else load_model(base)
    if loaded.tokenizer is None:
        raise ConfigError(f"model '{loaded.name}' has no tokenizer; training needs one.")
    tok = loaded.tokenizer
    base_fp = loaded.fingerprint or fingerprint(dict(loaded.model.state_dict()))
    ident = _identity(config, task, base_fp, model_digest(loaded.model))
    if config.resume and (meta := _finished(out_dir, ident)) is not None:
        return _reuse(meta, out_dir, loaded, task, config)
    train = task.examples("train", config.pool_size(), config.seed)
    if not train:
        raise ConfigError(f"task '{task.name}' gave no training examples.")
    rows = encode_examples(tok, task, train, config.max_prompt_tokens)
    ckpt_path = out_dir / CHECKPOINT
    if not config.resume and ckpt_path.exists():
        ckpt_path.unlink()  # starting over: an old checkpoint must not be resumed later
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model, give_back = wrap(loaded.model, config, loaded.path)
        try:
            return _train(model, tok, task, config, rows, out_dir, ckpt_path, ident, loaded, callbacks)
        finally:
            give_back()  # the caller's base model gets its plain layers (or its weights) back


def _train(
    model: Any, tok: Any, task: Task, config: LoraTrainConfig, rows: list[Any], out_dir: Path,
    ckpt_path: Path, ident: dict[str, Any], loaded: Any, callbacks: Sequence[Callable[[StepInfo], None]],
) -> TrainResult:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(
        config.optimizer, [p for _, p in named], lr=config.lr, steps=config.steps, seed=config.seed,
        hparams=config.optimizer_params, names=[n for n, _ in named], model=model,
        pool_size=len(rows), batch_size=config.batch_size,
    )
    try:
        return _run(opt, model, named, tok, task, config, rows, out_dir, ckpt_path, ident, loaded, callbacks)
    finally:
        close = getattr(opt, "close", None)
        if close is not None:
            close()  # e.g. DP-SGD removes its per-example-gradient hooks


def _run(
    opt: Any, model: Any, named: list[tuple[str, Any]], tok: Any, task: Task, config: LoraTrainConfig,
    rows: list[Any], out_dir: Path, ckpt_path: Path, ident: dict[str, Any], loaded: Any,
    callbacks: Sequence[Callable[[StepInfo], None]],
) -> TrainResult:
    start, losses, prior_seconds, resumed_from = 0, [], 0.0, None
    if ckpt_path.exists() and config.resume:
        trainable, opt_state, rng, record = load_checkpoint(ckpt_path)
        if {k: record.get(k) for k in ident} != ident or sorted(trainable) != sorted(n for n, _ in named):
            raise CheckpointError(
                f"{ckpt_path} was made with another base, task or config; pass resume=False to start "
                "over, or train into another out_dir."
            )
        with torch.no_grad():
            for n, p in named:
                p.copy_(trainable[n])
        opt.load_state_dict(opt_state)
        torch.set_rng_state(rng)
        start, losses, prior_seconds = record["step"], list(record["losses"]), record["seconds"]
        resumed_from = start
    sel = Selection(config.select_n, task, tok, ckpt_path.parent) if config.select_n else None
    if sel is not None:  # early stopping on validation: the start is a candidate too
        if resumed_from is not None:
            sel.restore(record)
        else:
            sel.observe(model, named, 0)
    started = time.perf_counter()
    pick = getattr(opt, "batch_indices", None)  # an optimizer that samples its own batches (DP-SGD)
    model.train()
    with loss_bar(f"Training {task.name}", config.steps, start) as advance:
        for step in range(start, config.steps):
            picked = pick(step, len(rows)) if pick else batch_indices(step, config.batch_size, len(rows), config.seed)
            batch = [rows[i] for i in picked]
            lr = config.lr_at(step)
            loss = opt.step(make_loss_fn(model, tok, batch) if batch else _no_examples, lr)
            losses.append(loss)
            advance(loss)
            seconds = prior_seconds + time.perf_counter() - started
            if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
                if sel is not None:  # scored before the checkpoint that records it; not training time
                    scoring = time.perf_counter()
                    sel.observe(model, named, step + 1)
                    started += time.perf_counter() - scoring
                save_checkpoint(
                    ckpt_path, trainable={n: p for n, p in named}, optimizer_state=opt.state_dict(),
                    rng_state=torch.get_rng_state(),
                    record={**ident, "step": step + 1, "position": (step + 1) * config.batch_size,
                            "losses": losses, "seconds": seconds, **(sel.record() if sel else {})},
                )
                if sel is not None:
                    sel.prune()
            called = time.perf_counter()
            for cb in callbacks:
                cb(StepInfo(step=step + 1, loss=loss, lr=lr, seconds=seconds))
            started += time.perf_counter() - called  # a callback's work (e.g. a validation) is not training time
    model.eval()
    seconds = prior_seconds + time.perf_counter() - started
    if sel is not None:  # the last step is a candidate; the adapter written is the best point
        sel.observe(model, named, config.steps)
        if sel.best != config.steps:
            sel.load_best(named)
    metrics = _evaluate(model, tok, task, config) if config.eval_n else None
    meta = {
        "format": FORMAT, **ident, "base": _base_name(loaded), "steps": config.steps, "seed": config.seed,
        "lr": config.lr, "rank": config.rank, "alpha": config.alpha, "optimizer": config.optimizer,
        "scheme": config.scheme,
        "final_loss": losses[-1], "train_loss": sum(losses[-max(1, len(losses) // 10):]) / max(1, len(losses) // 10),
        "losses": losses, "metrics": metrics, "seconds": seconds, "trainable_params": sum(p.numel() for _, p in named),
    }
    if sel is not None:
        meta["selection"] = sel.summary()
    if (report := getattr(opt, "report", None)) is not None:
        meta["optimizer_report"] = report()  # e.g. the privacy spent
    _write_adapter(model, out_dir, meta, peft_base_path(loaded))
    return TrainResult(out_dir, task.name, config.steps, losses, seconds, metrics, resumed_from, meta=meta)


def _no_examples() -> torch.Tensor:
    """The per-example losses of an empty batch: ``(0,)``."""
    return torch.zeros(0)


def _reuse(meta: dict[str, Any], out_dir: Path, loaded: Any, task: Task, config: LoraTrainConfig) -> TrainResult:
    """Return a finished adapter's result; evaluate it first when metrics are asked for and missing."""
    metrics = meta.get("metrics")
    have = metrics and metrics.get("asked_n") == config.eval_n and metrics.get("split") == config.eval_split
    if config.eval_n and not have:
        metrics = _evaluate(loaded.model, loaded.tokenizer, task, config, adapter=out_dir)
        meta = {**meta, "metrics": metrics}
        tmp = out_dir / f".{META_NAME}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out_dir / META_NAME)
    return TrainResult(
        out_dir, task.name, meta["steps"], list(meta["losses"]), meta["seconds"], metrics, reused=True, meta=meta
    )
