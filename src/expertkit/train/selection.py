"""Early stopping on validation inside :func:`~expertkit.train.train_lora` (``select_n``).

With ``select_n > 0`` the trainable weights are scored on ``select_n`` examples of the task's validation
split at the start, at every checkpoint and at the last step, and the adapter written is the point best on
validation (ties: the earlier step), not the last one. Measured reason: on ``bbc_topic`` ZO-SGD at the
learning rate best after a quarter of its run reached 0.78 test accuracy by step 1,000 and diverged to 0.21
by step 2,000 (docs/results.md, ZO-Bench); the point chosen on validation is the one worth keeping.

Resumable like the rest of a run: the curve and the best step go into every checkpoint's record and the
best point's weights into ``checkpoint/best-step-N.safetensors`` (written before the checkpoint that names
it, older ones deleted after), so a run killed anywhere resumes with the same choice. Scoring time is not
training time, and the training random stream is not touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_point(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write one point's weights (a safetensors file with string ``metadata``) atomically; an I/O error names
    ``path``. Shared with :mod:`expertkit.train.validated`."""
    from safetensors.torch import save

    from expertkit.fileio import write_atomic, writing

    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path):
        write_atomic(path, save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata))


class Selection:
    """The validation curve of one run and its best point so far."""

    def __init__(self, n: int, task: Any, tokenizer: Any, folder: Path) -> None:
        self.n, self.task, self.tokenizer, self.folder = n, task, tokenizer, folder
        self.curve: list[list[float]] = []  # [step, validation accuracy]
        self.best: int | None = None  # the step of the best point

    def restore(self, record: dict[str, Any]) -> None:
        """Continue from a checkpoint's record."""
        self.curve = [list(p) for p in record.get("selection", [])]
        self.best = record.get("selection_best")

    def record(self) -> dict[str, Any]:
        """What a checkpoint's record keeps of the selection."""
        return {"selection": self.curve, "selection_best": self.best}

    def _file(self, step: int) -> Path:
        return self.folder / f"best-step-{step:06d}.safetensors"

    def observe(self, model: Any, named: list[tuple[str, Any]], step: int) -> float:
        """Score ``model`` at ``step`` on validation; keep its weights when it is the best so far."""
        from expertkit.tasks.evaluate import evaluate

        with torch.random.fork_rng(devices=[]):  # training's random stream is not touched
            acc = float(evaluate(model, self.tokenizer, self.task, split="validation", n=self.n, seed=0).accuracy)
        self.curve = [p for p in self.curve if p[0] != step] + [[step, acc]]  # a resumed step is scored again
        scores = dict((int(s), a) for s, a in self.curve)
        if self.best is None or acc > scores.get(self.best, float("-inf")):
            save_point(self._file(step), dict(named), {"step": str(step)})
            self.best = step
        return acc

    def prune(self) -> None:
        """Delete the best-point files no checkpoint names any more (after a checkpoint was written)."""
        for p in self.folder.glob("best-step-*.safetensors"):
            if self.best is None or p != self._file(self.best):
                p.unlink(missing_ok=True)

    def load_best(self, named: list[tuple[str, Any]]) -> None:
        """Put the best point's weights into the trainable parameters."""
        from safetensors.torch import load_file

        if self.best is None:
            raise RuntimeError("no point was scored")
        tensors = load_file(str(self._file(self.best)))
        with torch.no_grad():
            for n, p in named:
                p.copy_(tensors[n])

    def summary(self) -> dict[str, Any]:
        """What ``expertkit.json`` records: the split, n, the curve and the step written."""
        return {"split": "validation", "n": self.n, "curve": self.curve, "step": self.best}
