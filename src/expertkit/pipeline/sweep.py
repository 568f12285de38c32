"""Run the independent cells of an experiment's sweep on an executor (in this process, or on Ray).

An experiment's sweep (privacy budgets x systems, tasks x optimizers, ...) is a list of :class:`Cell`:
a module-level function and its keyword arguments that computes one point and writes its own
result file (JSON, atomically: :func:`expertkit.fileio.write_atomic`) before returning the same
result. :func:`run_sweep` skips the cells whose result file is already there (and matches, see
:attr:`Cell.match`), sends the others to the executor as :class:`~expertkit.pipeline.executor.Job`
objects, and returns every cell's result in cell order. So an interrupted sweep resumes on either
executor, and the local executor runs the cells exactly as a plain loop would: one after the other,
in order, in this process, on the model the experiment loaded.

On Ray (``--executor ray``) each cell is a Ray task with the retries, per-cell logs
(``<log_dir>/<cell>.log``), shared-folder check and progress bar of
:class:`~expertkit.pipeline.ray_executor.RayExecutor`; a cell that fails on every attempt fails the
sweep with its own error once the other cells have finished and written their files. A cell's
function is sent to the workers by reference when its module is importable there (``expertkit``
itself) and by value otherwise (a script run as ``__main__``, a module loaded from a file).

:func:`add_executor_args` and :func:`sweep_executor` give experiments the same command-line switches
(``--executor {local,ray}``, ``--address``, ``--cpus-per-cell``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertkit.errors import ExpertkitError
from expertkit.pipeline.executor import Executor, ExecutorConfig, Job, ModelCache, make_executor


class SweepError(ExpertkitError, ValueError):
    """A sweep is malformed (two cells with one key or one result file, a cell that wrote no result)."""


@dataclass(frozen=True)
class Cell:
    """One point of a sweep: ``fn(loaded, **kwargs)`` (or ``fn(**kwargs)`` when ``model`` is None).

    ``fn`` must write ``result`` (JSON, atomically) and return the same value. ``match``: items a
    finished result file must hold (e.g. the cell's recipe), so that a file left by other settings is
    not reused; None: any readable result file counts as finished.
    """

    key: str
    fn: Callable[..., Any]
    result: Path
    kwargs: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    match: Mapping[str, Any] | None = None


def finished(cell: Cell) -> Any | None:
    """The saved result of ``cell`` when its result file is there, readable and matching; else None.

    A result file that cannot be read or parsed, or whose ``match`` items differ, does not count:
    the cell runs again and replaces it.
    """
    try:
        saved = json.loads(Path(cell.result).read_text())
    except (OSError, ValueError):
        return None
    if cell.match is not None:
        if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in cell.match.items()):
            return None
    return saved


def _check(cells: Sequence[Cell]) -> None:
    for attr in ("key", "result"):
        seen: set[Any] = set()
        for cell in cells:
            value = getattr(cell, attr) if attr == "key" else Path(cell.result).absolute()
            if value in seen:
                raise SweepError(f"two cells of the sweep have the {attr} '{value}': give every cell its own "
                                 "key and its own result file.")
            seen.add(value)


def run_sweep(name: str, cells: Sequence[Cell], executor: Executor, log_dir: Path) -> list[Any]:
    """Run the cells of ``cells`` that are not finished on ``executor``; every cell's result, in order.

    ``name`` labels the progress bar and errors; ``log_dir`` holds the per-cell logs of a Ray run.
    Raises :class:`~expertkit.pipeline.executor.JobFailedError` when a cell fails for good (Ray; the
    local executor lets the cell's own exception through, as a plain loop would), and
    :class:`SweepError` when a cell returned without writing its result file.
    """
    _check(cells)
    done = {cell.key: saved for cell in cells if (saved := finished(cell)) is not None}
    todo = [cell for cell in cells if cell.key not in done]
    ran = executor.map(name, [Job(c.key, c.fn, c.model, dict(c.kwargs)) for c in todo], log_dir) if todo else {}
    for cell in todo:
        if not Path(cell.result).is_file():
            raise SweepError(f"sweep {name}: cell '{cell.key}' returned without writing its result file "
                             f"{cell.result}; a cell's function must write it (atomically) so that a rerun "
                             "can skip the cell.")
    return [done[cell.key] if cell.key in done else ran[cell.key] for cell in cells]


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--executor``, ``--address`` and ``--cpus-per-cell`` to an experiment's parser."""
    group = parser.add_argument_group("where the sweep's cells run")
    group.add_argument("--executor", choices=["local", "ray"], default="local",
                       help="local: one after the other in this process (default); ray: Ray tasks")
    group.add_argument("--address", default=None,
                       help="Ray cluster address (host:6379, or auto); default: start a local Ray for the run")
    group.add_argument("--cpus-per-cell", type=float, default=1.0, help="CPUs Ray reserves for each cell")


def sweep_executor(args: argparse.Namespace, models: ModelCache, out: Path) -> Executor:
    """The executor of ``args`` (see :func:`add_executor_args`) for a sweep writing under ``out``.

    ``models.base``: the source the cells run on (a bundled name or an absolute folder; None: the
    cells load their own). Locally it is loaded once, by the first cell that runs, and shared by the
    others and by the caller (``models.get``); on Ray each worker loads it once.
    """
    if args.executor == "local" and args.address is not None:
        raise SweepError("--address names a Ray cluster: pass it with --executor ray.")
    config = ExecutorConfig(kind=args.executor, address=args.address, num_cpus=args.cpus_per_cell)
    return make_executor(config, models, out)


def saved_results(path: Path, digest: str) -> dict[str, Any] | None:
    """The experiment results saved at ``path`` (None when there are none), refused unless they belong to
    the same subject: their ``moe_digest`` (the weights' digest, :func:`expertkit.weights.fingerprint.model_digest`)
    must equal ``digest`` (results without one cannot be tied to any weights). Read once."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    other = saved.get("moe_digest")
    if other != digest:
        raise SweepError(f"{path} holds results of another MoE (digest {other or 'not recorded'}, this one "
                         f"{digest}); move {path.parent} away or give another --out.")
    return saved
