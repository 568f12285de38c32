"""The zoo planner's candidate evaluations as executor jobs (``expertkit zoo plan --executor``).

:class:`JobEvaluator` is a batch evaluator for :func:`~expertkit.merge.zoo.select.select_strategy`
(and so for :func:`~expertkit.merge.zoo.plan_zoo`, through :func:`job_evaluator_factory`): each
candidate of a batch (the members alone, the grid, a CMA-ES generation) becomes one
:class:`~expertkit.pipeline.executor.Job` on the executor, and the batch's jobs run together
(one after the other in this process with the local executor; side by side on Ray). A job loads
the cluster's model through the executor's model cache (once per process) and scores the
candidate with the same code as the in-process
:class:`~expertkit.merge.zoo.evaluator.PatchedEvaluator` (:func:`~expertkit.merge.zoo.evaluator.patched_scores`),
so both give the same scores and the planner the same plan.

A candidate's tensors reach its job as a safetensors file in the work folder,
``<work>/candidates/<digest>.safetensors``, written atomically (temporary file, fsync, rename) and
named by the content digest of the tensors; the file is removed once the batch is scored. A file
rather than the job's arguments: the driver then holds one candidate at a time (it writes each and
drops it) instead of a whole batch waiting in Ray's object store, a retried job reads the same file
again, and the work folder is the run folder whose sharing the Ray executor already checks. With a
``cache_dir`` (the CLI gives ``$EXPERTKIT_CACHE/eval``), each task's score is cached by
:func:`expertkit.tasks.evaluate` under a name of the patched model made of the digest of the
cluster's model as loaded (every weight, computed once per process) and the candidate's digest, so a
rerun on either executor reuses the scores it finished.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from expertkit.merge.zoo.select import StateDict
from expertkit.pipeline.executor import Executor, Job, model_source
from expertkit.tasks.base import Task

_DIGESTS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def _model_digest(model: torch.nn.Module) -> str:
    """:func:`~expertkit.weights.fingerprint.model_digest` of an unpatched model, once per model object."""
    from expertkit.weights.fingerprint import model_digest

    if model not in _DIGESTS:
        _DIGESTS[model] = model_digest(model)
    return _DIGESTS[model]


def score_candidate(loaded: Any, *, tensors: str, digest: str, tasks: list[Task], split: str, n: int, seed: int,
                    batch_size: int, cache_dir: str | None) -> dict[str, float]:
    """The job: accuracy per task of ``loaded`` with the candidate file ``tensors`` patched in."""
    from safetensors.torch import load_file

    from expertkit.merge.zoo.evaluator import patched_scores

    fingerprint = None
    if cache_dir is not None:  # names the patched model: the model as loaded, then this candidate
        fingerprint = f"zoo-candidate-v1:{_model_digest(loaded.model)}:{digest}"
    return patched_scores(loaded, load_file(tensors), tasks, split=split, n=n, seed=seed, batch_size=batch_size,
                          cache_dir=cache_dir, model_fingerprint=fingerprint)


def _write_candidate(path: Path, tensors: StateDict) -> None:
    """Write ``tensors`` as a safetensors file at ``path``, atomically (unless it is already there)."""
    from safetensors.torch import save

    from expertkit.fileio import write_atomic

    if path.is_file():
        return
    # clone: safetensors refuses tensors that share storage; contiguous CPU copies always serialise
    data = save({name: t.detach().to("cpu").clone().contiguous() for name, t in tensors.items()})
    write_atomic(path, data)


class JobEvaluator:
    """``evaluator(tensors)`` and ``evaluator.many(candidates)``: mean accuracy over ``tasks`` of the
    model at ``folder`` with each candidate patched in, one executor job per candidate.

    The scores equal :class:`~expertkit.merge.zoo.evaluator.PatchedEvaluator`'s with the same
    ``split``, ``n``, ``seed`` and ``batch_size``. ``work_dir``: where the candidates' files and the
    jobs' logs (``logs/``) go; on Ray it must be the folder the executor checks (its run folder).
    """

    def __init__(self, executor: Executor, folder: str | os.PathLike[str], tasks: Sequence[str | Task],
                 work_dir: str | os.PathLike[str], *, split: str = "validation", n: int = 50, seed: int = 0,
                 batch_size: int = 16, cache_dir: str | os.PathLike[str] | None = None,
                 stage: str = "zoo plan") -> None:
        from expertkit.tasks.base import get_task

        self.executor, self.model = executor, model_source(str(folder))
        # Task objects travel to the workers (a task registered only in this process still runs there)
        self.tasks = [get_task(t) if isinstance(t, str) else t for t in tasks]
        self.work_dir, self.stage = Path(work_dir).absolute(), stage
        self.split, self.n, self.seed, self.batch_size = split, n, seed, batch_size
        self.cache_dir = None if cache_dir is None else str(Path(cache_dir).absolute())
        self.history: list[dict[str, float]] = []

    def __call__(self, tensors: StateDict) -> float:
        """The mean accuracy of one candidate (a batch of one)."""
        return self.many([tensors])[0]

    def many(self, candidates: Iterable[StateDict]) -> list[float]:
        """Mean accuracy of each candidate, in order: the candidates' jobs run as one batch."""
        from expertkit.weights.fingerprint import content_digest

        folder = self.work_dir / "candidates"
        digests: list[str] = []
        jobs: dict[str, Job] = {}  # one job per distinct candidate
        try:
            for tensors in candidates:  # made one at a time: each is written, then dropped
                digest = content_digest(tensors)
                digests.append(digest)
                if digest in jobs:
                    continue
                path = folder / f"{digest}.safetensors"
                _write_candidate(path, tensors)
                jobs[digest] = Job(f"candidate:{digest[:12]}", score_candidate, self.model, {
                    "tensors": str(path), "digest": digest, "tasks": self.tasks, "split": self.split, "n": self.n,
                    "seed": self.seed, "batch_size": self.batch_size, "cache_dir": self.cache_dir})
            done = self.executor.map(self.stage, list(jobs.values()), self.work_dir / "logs") if jobs else {}
        finally:
            for digest in jobs:
                (folder / f"{digest}.safetensors").unlink(missing_ok=True)
        out = []
        for digest in digests:
            scores = done[jobs[digest].key]
            self.history.append(scores)
            out.append(sum(scores.values()) / len(scores))  # as PatchedEvaluator: the mean in task order
        return out


def job_evaluator_factory(executor: Executor, work_dir: str | os.PathLike[str], *, split: str = "validation",
                          n: int = 50, seed: int = 0, batch_size: int = 16,
                          cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """An ``evaluator_factory`` for :func:`~expertkit.merge.zoo.plan_zoo` whose evaluators are
    :class:`JobEvaluator`\\ s on ``executor`` (pass the planner's ``split``, ``n`` and ``seed`` here too)."""

    def factory(folder: Path, tasks: list[str]) -> JobEvaluator:
        return JobEvaluator(executor, folder, tasks, work_dir, split=split, n=n, seed=seed, batch_size=batch_size,
                            cache_dir=cache_dir)

    return factory
