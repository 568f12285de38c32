"""Experiment sweeps on an executor: finished cells skipped, results in order, the same files in-process
and on Ray, a failing cell's own error with the other cells' files kept."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from expertkit.fileio import write_atomic
from expertkit.pipeline.executor import ExecutorConfig, JobFailedError, LocalExecutor, ModelCache
from expertkit.pipeline.sweep import Cell, SweepError, finished, run_sweep, saved_results


def _square(x: int, result: Path, runs: Path) -> dict:
    """x squared (and a seeded draw), written to ``result``; one line per call appended to ``runs``."""
    runs.parent.mkdir(parents=True, exist_ok=True)
    with open(runs, "a") as fh:
        fh.write(f"{x} {os.getpid()}\n")
    row = {"x": x, "y": x * x, "draw": torch.randn(3, generator=torch.Generator().manual_seed(x)).tolist()}
    write_atomic(result, json.dumps(row).encode())
    return row


def _logits(loaded, result: Path) -> dict:
    """The tiny model's summed logits on a fixed input (rounded: thread counts may differ per process)."""
    ids = torch.tensor([[1, 2, 3, 4]])  # (1, 4)
    with torch.no_grad():
        total = loaded.model(ids).logits.double().sum().item()  # (1, 4, vocab) summed
    row = {"logits": round(total, 6), "name": loaded.name}
    write_atomic(result, json.dumps(row).encode())
    return row


def _forgets(x: int) -> int:
    return x


def _broken(x: int) -> None:
    raise ArithmeticError(f"cell {x} cannot be computed")


def _cells(out: Path, xs=(3, 1, 2), match: dict | None = None) -> list[Cell]:
    return [Cell(f"x{x}", _square, out / f"x{x}.json", {"x": x, "result": out / f"x{x}.json", "runs": out / "runs"},
                 match=match) for x in xs]


def _local() -> LocalExecutor:
    return LocalExecutor(ModelCache())


def test_finished_cells_are_skipped_and_results_come_back_in_cell_order(tmp_path):
    out = tmp_path / "sweep"
    first = run_sweep("s", _cells(out, match={"x": 3}), _local(), out / "logs")
    assert [r["y"] for r in first] == [9, 1, 4]
    assert [line.split()[0] for line in (out / "runs").read_text().splitlines()] == ["3", "1", "2"]  # cell order
    (out / "x1.json").unlink()
    (out / "x2.json").write_text("{not json")  # unreadable: runs again
    again = run_sweep("s", _cells(out, xs=(3, 1, 2, 5)), _local(), out / "logs")
    assert again == first + [{"x": 5, "y": 25, "draw": again[3]["draw"]}]
    assert [line.split()[0] for line in (out / "runs").read_text().splitlines()] == ["3", "1", "2", "1", "2", "5"]
    # match: a result file of other settings is not reused
    assert finished(_cells(out, xs=(3,), match={"x": 3})[0]) == first[0]
    assert finished(_cells(out, xs=(3,), match={"x": 4})[0]) is None
    run_sweep("s", _cells(out, xs=(3,), match={"x": 4}), _local(), out / "logs")
    assert (out / "runs").read_text().splitlines()[-1].split()[0] == "3"


def test_malformed_sweeps_are_refused(tmp_path):
    twice = _cells(tmp_path, xs=(1,)) * 2
    with pytest.raises(SweepError, match="two cells of the sweep have the key 'x1'"):
        run_sweep("s", twice, _local(), tmp_path)
    silent = [Cell("quiet", _forgets, tmp_path / "quiet.json", {"x": 1})]
    with pytest.raises(SweepError, match="cell 'quiet' returned without writing its result file"):
        run_sweep("s", silent, _local(), tmp_path)


def test_a_failing_cell_stops_a_local_sweep_with_its_own_error_keeping_earlier_files(tmp_path):
    cells = _cells(tmp_path, xs=(1,)) + [Cell("bad", _broken, tmp_path / "bad.json", {"x": 7})]
    with pytest.raises(ArithmeticError, match="cell 7 cannot be computed"):
        run_sweep("s", cells + _cells(tmp_path, xs=(2,)), _local(), tmp_path / "logs")
    assert (tmp_path / "x1.json").is_file() and not (tmp_path / "x2.json").exists()


def test_a_sweep_on_ray_writes_the_in_process_files(local_ray, tmp_path, tiny_checkpoint):
    from expertkit.pipeline.ray_executor import RayExecutor

    model = str(tiny_checkpoint("llama"))

    def cells(out: Path) -> list[Cell]:
        return _cells(out) + [Cell("logits", _logits, out / "logits.json", {"result": out / "logits.json"}, model)]

    here = run_sweep("s", cells(tmp_path / "here"), _local(), tmp_path / "here" / "logs")
    ray_run = tmp_path / "ray"
    ray_run.mkdir()
    executor = RayExecutor(ExecutorConfig(kind="ray", max_retries=0), ray_run, model)
    there = run_sweep("s", cells(ray_run), executor, ray_run / "logs")
    assert there == here and here[3]["name"] == Path(model).name
    for name in ("x3.json", "x1.json", "x2.json", "logits.json"):
        assert (ray_run / name).read_bytes() == (tmp_path / "here" / name).read_bytes()
    pids = {line.split()[1] for line in (ray_run / "runs").read_text().splitlines()}
    assert str(os.getpid()) not in pids  # the cells ran in Ray's workers
    assert "=== x1: attempt 1/1" in (ray_run / "logs" / "x1.log").read_text()
    # a rerun on Ray runs only the cell whose file is missing; a failing cell fails the sweep for good
    (ray_run / "x1.json").unlink()
    broken = Cell("bad", _broken, ray_run / "bad.json", {"x": 7})
    with pytest.raises(JobFailedError) as info:
        run_sweep("s", [*cells(ray_run), broken], executor, ray_run / "logs")
    assert "job 'bad' failed after 1 attempt: ArithmeticError: cell 7 cannot be computed" in str(info.value)
    assert "the 1 other job(s) finished and are kept" in str(info.value)
    assert json.loads((ray_run / "x1.json").read_text()) == here[1]
    assert len((ray_run / "runs").read_text().splitlines()) == 4  # 3 cells, then x1 again


def test_saved_results_are_reused_only_for_the_same_weights(tmp_path):
    path = tmp_path / "results.json"
    assert saved_results(path, "a" * 32) is None  # nothing saved yet
    path.write_text(json.dumps({"moe_digest": "a" * 32, "systems": {"fp": 1}}))
    assert saved_results(path, "a" * 32) == {"moe_digest": "a" * 32, "systems": {"fp": 1}}
    with pytest.raises(SweepError, match=f"another MoE \\(digest {'a' * 32}, this one {'b' * 32}\\)"):
        saved_results(path, "b" * 32)
    path.write_text(json.dumps({"systems": {"fp": 1}}))  # results that name no weights cannot be reused
    with pytest.raises(SweepError, match="digest not recorded"):
        saved_results(path, "a" * 32)
    assert json.loads(path.read_text()) == {"systems": {"fp": 1}}  # refused, not overwritten
