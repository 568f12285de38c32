"""Run a stage's jobs as Ray tasks: resource requests, retries, one progress bar, one log per job.

Retries are made here rather than with Ray's own ``max_retries``, so that the driver knows each
attempt (it shows retries in the progress bar and notes them in the job's log) and can leave
deterministic input errors (:class:`~expertkit.errors.ExpertkitError`, e.g. a worker that cannot
see the run folder) unretried. A job that fails on every attempt fails the stage with its own error
message once every other job has finished: their outputs are on disk (adapters, the evaluation
cache) and a rerun reuses them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expertkit.errors import ExpertkitError
from expertkit.pipeline.executor import (
    ExecutorConfig,
    Job,
    JobFailedError,
    ModelCache,
    check_marker,
    log_name,
    write_marker,
)

_WORKER: dict[str, ModelCache] = {}  # in a worker process: the models of the last base it ran on


def _stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _append(log: Path, text: str) -> None:
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(text)


def run_job(job: Job, base: str, run_dir: str, token: str, log: str, attempt: int, attempts: int) -> Any:
    """The body of a Ray task: check the run folder, run ``job`` with its output in ``log``."""
    from expertkit.progress import is_quiet, set_quiet

    quiet = is_quiet()
    set_quiet(True)  # bars would only clutter the job's log
    try:
        return _run_logged(job, base, run_dir, token, log, attempt, attempts)
    finally:
        set_quiet(quiet)


def _run_logged(job: Job, base: str, run_dir: str, token: str, log: str, attempt: int, attempts: int) -> Any:
    check_marker(Path(run_dir), token)
    if base not in _WORKER:
        _WORKER.clear()
        _WORKER[base] = ModelCache(base)
    _append(Path(log), f"=== {job.key}: attempt {attempt}/{attempts} on {socket.gethostname()} "
                       f"pid {os.getpid()} at {_stamp()}\n")
    with open(log, "a", encoding="utf-8", buffering=1) as fh, \
            contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            result = job.call(_WORKER[base])
        except BaseException:
            traceback.print_exc(file=fh)
            raise
        print(f"=== finished at {_stamp()}", file=fh)
    return result


def _cause(exc: Exception) -> BaseException:
    """The job's own exception inside a Ray error (the error itself when it carries none)."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        return cause if isinstance(cause, BaseException) else exc
    return exc


def _describe(exc: BaseException) -> str:
    import ray.exceptions

    if isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return "the worker running it died (killed, or out of memory)"
    if isinstance(exc, ray.exceptions.RayError):
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return f"{type(exc).__name__}: {exc}"


class RayExecutor:
    """Send jobs to Ray (a local one started for the run, or the cluster at ``config.address``)."""

    def __init__(self, config: ExecutorConfig, run_dir: Path, base: str) -> None:
        self.config, self.run_dir, self.base = config, Path(run_dir).absolute(), base
        self._started = False
        self._remote: Any = None

    def _connect(self) -> Any:
        """Start or reach Ray on first use (a run whose stages are all reused never does)."""
        import ray

        if not ray.is_initialized():
            try:
                ray.init(address=self.config.address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"at {self.config.address}" if self.config.address else "locally"
                raise ExpertkitError(
                    f"could not start or reach Ray {where}: {exc}. Start a cluster with `ray start --head` "
                    "and pass its address with --address, or run without --executor ray.") from exc
            self._started = True
        if self._remote is None:
            options: dict[str, Any] = {"num_cpus": self.config.num_cpus, "num_gpus": self.config.num_gpus,
                                       "max_retries": 0}
            if self.config.memory_gb is not None:
                options["memory"] = int(self.config.memory_gb * 2**30)
            self._remote = ray.remote(run_job).options(**options)
        return self._remote

    def map(self, stage: str, jobs: Sequence[Job], log_dir: Path) -> dict[str, Any]:
        """Run every job as a Ray task, retrying failed or killed ones; see the module docstring."""
        import ray

        from expertkit.progress import job_bar

        remote = self._connect()
        log_dir.mkdir(parents=True, exist_ok=True)
        token = write_marker(self.run_dir)
        attempts = self.config.max_retries + 1
        logs = {job.key: str((log_dir / log_name(job.key)).absolute()) for job in jobs}

        def submit(job: Job, attempt: int) -> Any:
            return remote.remote(job, self.base, str(self.run_dir), token, logs[job.key], attempt, attempts)

        pending = {submit(job, 1): (job, 1) for job in jobs}
        results: dict[str, Any] = {}
        failed: dict[str, str] = {}
        retries = 0
        try:
            with job_bar(f"{stage} on Ray", len(jobs)) as update:
                while pending:
                    [ref], _ = ray.wait(list(pending), num_returns=1)
                    job, attempt = pending.pop(ref)
                    try:
                        results[job.key] = ray.get(ref)
                        update(done=1)
                        continue
                    except ray.exceptions.RayError as exc:
                        cause = _cause(exc)
                    why = _describe(cause)
                    _append(Path(logs[job.key]), f"=== attempt {attempt}/{attempts} failed: {why}\n")
                    if attempt < attempts and not isinstance(cause, ExpertkitError):
                        retries += 1
                        pending[submit(job, attempt + 1)] = (job, attempt + 1)
                        update(note=f"({retries} {'retry' if retries == 1 else 'retries'})")
                        continue
                    failed[job.key] = (f"job '{job.key}' failed after {attempt} "
                                       f"attempt{'s' if attempt > 1 else ''}: {why} (log: {logs[job.key]})")
                    update(done=1, note="(failed)")
        except BaseException:  # e.g. Ctrl-C: stop the other jobs; what they finished stays reusable
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if failed:
            kept = f"; the {len(results)} other job(s) finished and are kept: run again to reuse them" if results else ""
            raise JobFailedError(f"stage {stage}: " + "; ".join(failed.values()) + kept + ".")
        return {job.key: results[job.key] for job in jobs}

    def close(self) -> None:
        """Shut down the Ray this executor started (a cluster it connected to stays up)."""
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()
