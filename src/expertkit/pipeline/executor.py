"""Where the independent jobs of a stage run: in this process (the default) or on a Ray cluster.

A stage that has independent jobs (one expert per task, one evaluation cell per model and task)
describes each as a :class:`Job` and hands the list to ``ctx.executor.map``. A job is a module-level
function called as ``fn(loaded, **kwargs)``, where ``loaded`` is the job's model (a
:class:`~expertkit.models.LoadedModel` of ``job.model``), or as ``fn(**kwargs)`` when ``job.model`` is
None (a job that needs no model, or loads its own); it writes its outputs through the same atomic
writers and caches on either executor, so both give the same results and a rerun on either reuses
what is finished. The cells of an experiment's sweep run through the same executors
(:mod:`expertkit.pipeline.sweep`), and so do the zoo planner's candidate evaluations
(:mod:`expertkit.pipeline.zoo_jobs`).

* :class:`LocalExecutor` runs the jobs one after the other in this process with the run's model
  (the behaviour from before executors existed; the first failure stops the stage).
* :class:`~expertkit.pipeline.ray_executor.RayExecutor` sends them to Ray as tasks with resource
  requests, retries a failed or killed worker's job, keeps the others' results when one fails for
  good, shows one progress bar for the stage and writes one log per job in the run folder.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field

from expertkit.config import Config
from expertkit.errors import ExpertkitError
from expertkit.fileio import write_atomic


class ExecutorConfig(Config):
    """The ``executor:`` section of a run config (``expertkit run --executor`` overrides ``kind``)."""

    kind: Literal["local", "ray"] = Field("local", description="local: in this process; ray: Ray tasks")
    address: str | None = Field(None, description="Ray cluster address (e.g. 10.0.0.1:6379, or 'auto'); "
                                "none: a local Ray is started for the run")
    max_retries: int = Field(2, ge=0, le=20, description="retries of a failed or killed job before the stage fails")
    num_cpus: float = Field(1.0, gt=0, description="CPUs requested per job (Ray sets its OMP_NUM_THREADS from it)")
    memory_gb: float | None = Field(None, gt=0, description="memory requested per job in GB (none: no request)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs requested per job")


class JobFailedError(ExpertkitError, RuntimeError):
    """A job of a stage failed on every attempt (or could not run at all)."""


class SharedFolderError(ExpertkitError, OSError):
    """A worker cannot see the run folder: it is not on a path every node reaches."""


@dataclass(frozen=True)
class Job:
    """One independent unit of a stage: ``fn(loaded_model_of(model), **kwargs)``.

    ``key`` names the job in progress, errors and its log file; ``model`` is the model source
    (bundled name or absolute folder) the job runs on, or None for a job called as ``fn(**kwargs)``.
    """

    key: str
    fn: Callable[..., Any]
    model: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def call(self, models: ModelCache) -> Any:
        """Run the job in this process, its model (if any) taken from ``models``."""
        if self.model is None:
            return self.fn(**self.kwargs)
        return self.fn(models.get(self.model), **self.kwargs)


class Executor(Protocol):
    """Runs a stage's jobs and returns ``{job.key: result}`` in job order."""

    def map(self, stage: str, jobs: Sequence[Job], log_dir: Path) -> dict[str, Any]:
        """Run every job; raise :class:`JobFailedError` when one fails for good."""
        ...

    def close(self) -> None:
        """Release what the executor holds (e.g. the Ray it started)."""
        ...


class ModelCache:
    """Loaded models of one process: the run's base model is kept, plus the last other one
    (e.g. a merged model evaluated on several tasks), so that consecutive jobs do not reload."""

    def __init__(self, base: str | None = None, loader: Callable[[], Any] | None = None) -> None:
        self.base, self._base_loader = base, loader
        self._base: Any = None
        self._other: tuple[str, Any] | None = None

    def get(self, source: str) -> Any:
        """The loaded model of ``source`` (loaded on first use)."""
        from expertkit.models import load_model

        if source == self.base:
            if self._base is None:
                self._base = self._base_loader() if self._base_loader else load_model(source)
            return self._base
        if self._other is None or self._other[0] != source:
            self._other = None  # free the previous one before loading the next
            self._other = (source, load_model(source))
        return self._other[1]


def model_source(model: str) -> str:
    """The model source as every process sees it: a folder made absolute, other sources unchanged."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def log_name(key: str) -> str:
    """A file name for a job key (``expert:lo-hi`` -> ``expert_lo-hi.log``)."""
    return re.sub(r"[^\w.-]+", "_", key).strip("_") + ".log"


class LocalExecutor:
    """Run jobs one after the other in this process, on the run's model (the default)."""

    def __init__(self, models: ModelCache) -> None:
        self.models = models

    def map(self, stage: str, jobs: Sequence[Job], log_dir: Path) -> dict[str, Any]:
        """Run each job in order; the first failure propagates as it is."""
        return {job.key: job.call(self.models) for job in jobs}

    def close(self) -> None:
        """Nothing to release."""


# --- the run-folder check every worker makes before its job ------------------------------------

MARKER = ".executor-check"


def write_marker(run_dir: Path) -> str:
    """Write a fresh random token into the run folder; workers compare it with the one they were sent."""
    token = secrets.token_hex(8)
    write_atomic(run_dir / MARKER, token)
    return token


def check_marker(run_dir: Path, token: str) -> None:
    """Raise :class:`SharedFolderError` unless this process sees the driver's run folder."""
    try:
        seen = (run_dir / MARKER).read_text().strip()
    except OSError:
        seen = None
    if seen != token:
        found = "a different run folder" if seen else "no run folder"
        raise SharedFolderError(
            f"worker on host '{socket.gethostname()}' (pid {os.getpid()}) sees {found} at {run_dir}: the run "
            "folder must be on a path every node of the Ray cluster reaches (a shared file system mounted "
            "at the same path), or results written there by workers would be lost. Put output_dir on such "
            "a path (and EXPERTKIT_CACHE too), or run without --executor ray.")


def make_executor(config: ExecutorConfig, models: ModelCache, run_dir: Path) -> Executor:
    """The executor a run config asks for (``models.base`` is the run's model source)."""
    if config.kind == "local":
        return LocalExecutor(models)
    from expertkit.pipeline.ray_executor import RayExecutor

    return RayExecutor(config, run_dir, models.base or "")
