"""The real evaluator of strategy selection: merged tensors patched into one loaded model.

Merging inside a cluster changes only the tensors that vary between its members (for LoRA
experts of one base: the adapted projections), so :class:`PatchedEvaluator` loads the cluster's
model once and, for each candidate, copies the candidate tensors in, evaluates the cluster's
tasks (mean accuracy over tasks on ``split``, ``n`` examples each, seeded) and restores the
original tensors. Memory: one model plus one candidate's varying tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from expertkit.errors import IncompatibleModelsError


@contextlib.contextmanager
def patched(model: Any, tensors: Mapping[str, torch.Tensor]) -> Iterator[Any]:
    """Temporarily replace ``model``'s named tensors (state-dict names) by ``tensors``."""
    state = model.state_dict()
    missing = [n for n in tensors if n not in state]
    if missing:
        raise IncompatibleModelsError(f"the model has no tensors named {', '.join(missing[:3])}.")
    saved = {n: state[n].detach().clone() for n in tensors}
    try:
        with torch.no_grad():
            for n, t in tensors.items():
                state[n].copy_(t.to(state[n].dtype))
        yield model
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                state[n].copy_(t)


def patched_scores(
    loaded: Any, tensors: Mapping[str, torch.Tensor], tasks: Sequence[Any], *, split: str, n: int, seed: int,
    batch_size: int, cache_dir: str | os.PathLike[str] | None = None, model_fingerprint: str | None = None,
) -> dict[str, float]:
    """Accuracy per task (task name -> accuracy, in task order) of ``loaded`` with ``tensors`` patched in.

    ``tasks``: task names or :class:`~expertkit.tasks.base.Task` objects. ``cache_dir`` and
    ``model_fingerprint`` go to :func:`expertkit.tasks.evaluate` (the fingerprint must name the
    patched model, e.g. the base's digest and the candidate's). The one scoring of
    :class:`PatchedEvaluator` and of the planner's executor jobs (:mod:`expertkit.pipeline.zoo_jobs`).
    """
    from expertkit.tasks import evaluate

    out = {}
    with patched(loaded.model, tensors):
        for task in tasks:
            r = evaluate(loaded.model, loaded.tokenizer, task, split=split, n=n, seed=seed, batch_size=batch_size,
                         cache_dir=cache_dir, model_fingerprint=model_fingerprint)
            out[task if isinstance(task, str) else task.name] = r.accuracy
    return out


class PatchedEvaluator:
    """``evaluator(tensors) -> mean accuracy`` over ``tasks`` of ``model`` with ``tensors`` patched in."""

    def __init__(
        self, model: Any, tasks: Sequence[str], *, split: str = "validation", n: int = 50, seed: int = 0,
        batch_size: int = 16,
    ) -> None:
        from expertkit.models import LoadedModel, load_model

        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.tasks, self.split, self.n, self.seed, self.batch_size = list(tasks), split, n, seed, batch_size
        self.history: list[dict[str, float]] = []

    def scores(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Accuracy per task with ``tensors`` patched in."""
        out = patched_scores(self.loaded, tensors, self.tasks, split=self.split, n=self.n, seed=self.seed,
                             batch_size=self.batch_size)
        self.history.append(out)
        return out

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> float:
        s = self.scores(tensors)
        return sum(s.values()) / len(s)


def evaluator_for(folder: str | os.PathLike[str], tasks: Sequence[str], **kw: Any) -> PatchedEvaluator:
    """The default evaluator factory of the planner: load ``folder`` and score ``tasks``."""
    return PatchedEvaluator(folder, tasks, **kw)
