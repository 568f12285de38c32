"""What a stage sees while it runs: the run folder, the config, and the base model (loaded lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from expertkit.pipeline.config import RunConfig

if TYPE_CHECKING:
    from expertkit.pipeline.executor import Executor, Job


@dataclass
class RunContext:
    """Shared state of one run; the base model is loaded on first use and kept."""

    config: RunConfig
    run_dir: Path
    results: dict[str, Any] = field(default_factory=dict)  # stage name -> saved result of earlier stages
    executor: Any = field(default=None, repr=False)  # an Executor; None: jobs run in this process
    stage_dir: Path | None = None  # folder of the stage now running (its job logs go to logs/)
    _model: Any = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        """The run's seed."""
        return self.config.seed

    def model(self) -> Any:
        """The base model as a :class:`~expertkit.models.LoadedModel` (loaded once)."""
        if self._model is None:
            from expertkit.models import load_model
            from expertkit.progress import status

            with status(f"Loading {self.config.model}"):
                self._model = load_model(self.config.model)
        return self._model

    def job_executor(self) -> Executor:
        """The run's executor; without one, a local executor on the run's model (jobs in this process)."""
        from expertkit.pipeline.executor import LocalExecutor, ModelCache

        return self.executor or LocalExecutor(ModelCache(self.model_source(), self.model))

    def run_jobs(self, stage: str, jobs: Sequence[Job]) -> dict[str, Any]:
        """Run a stage's independent jobs on the run's executor; ``{job.key: result}`` in job order."""
        log_dir = (self.stage_dir or self.run_dir / "stages" / stage) / "logs"
        return self.job_executor().map(stage, jobs, log_dir)

    def model_source(self) -> str:
        """The run's model as every process names it (a folder made absolute)."""
        from expertkit.pipeline.executor import model_source

        return model_source(self.config.model)

    def earlier(self, kind: str) -> list[dict[str, Any]]:
        """Results of the earlier stages of ``kind``, in run order."""
        return [saved["result"] for saved in self.results.values() if saved.get("kind") == kind]

    def model_path(self) -> Path:
        """Local folder of the base model (bundled models are converted on first use)."""
        from expertkit.models.loader import resolve

        kind, folder = resolve(self.config.model)
        if folder is None:
            return self.model().path
        return folder


class Stage(Protocol):
    """A pipeline stage: ``run`` returns a JSON-able result; ``report`` renders it as markdown."""

    def run(self, ctx: RunContext, params: Any) -> dict[str, Any]:
        """Do the work and return the result."""
        ...

    def report(self, result: dict[str, Any]) -> str:
        """A markdown section for report.md."""
        ...
