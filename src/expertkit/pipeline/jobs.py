"""The independent jobs of the ``train_experts`` and ``evaluate`` stages, as module-level functions.

Each is called as ``fn(loaded, **kwargs)`` by an executor (:mod:`expertkit.pipeline.executor`) in
this process or in a Ray worker; it writes through the library's atomic writers and caches and
returns a small JSON-able dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expertkit.tasks.base import Task
from expertkit.train.config import LoraTrainConfig


def train_expert(loaded: Any, *, task: Task, out_dir: str, config: LoraTrainConfig) -> dict[str, Any]:
    """Train (or resume, or reuse) the LoRA expert of ``task`` into ``out_dir``."""
    from expertkit.train import train_lora

    res = train_lora(loaded, task, Path(out_dir), config)
    return {"final_loss": res.final_loss, "train_loss": res.train_loss, "seconds": round(res.seconds, 1)}


def evaluate_cell(loaded: Any, *, task: Task, adapter: str | None, split: str, n: int, seed: int,
                  batch_size: int, cache_dir: str) -> dict[str, Any]:
    """Accuracy of ``loaded`` (with ``adapter`` when given) on ``task``: one cell of the matrix."""
    from expertkit.tasks.evaluate import evaluate

    r = evaluate(loaded, None, task, split=split, n=n, seed=seed, batch_size=batch_size,
                 adapter=adapter, cache_dir=cache_dir)
    return {"accuracy": r.accuracy, "ci": [r.ci_low, r.ci_high], "n": r.n}
