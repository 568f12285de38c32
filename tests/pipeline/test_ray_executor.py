"""`expertkit run --executor ray`: the same results as in-process, retries, kept results, clear errors.

The local Ray (2 CPUs) is the package's ``local_ray`` fixture (tests/pipeline/conftest.py). Jobs that
must run code of this module in a worker (the toy tasks below) are shipped by value (cloudpickle).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray  # a pinned runtime dependency (expertkit run --executor ray): a broken install fails
import torch

from expertkit.errors import ConfigError
from expertkit.pipeline import parse_run_config, run_pipeline
from expertkit.pipeline.executor import (
    ExecutorConfig,
    Job,
    JobFailedError,
    SharedFolderError,
    check_marker,
    write_marker,
)
from expertkit.registry import Entry
from expertkit.tasks.base import TASKS, Task
from expertkit.tasks.toy import _lohi_build, copy_task, exact, lohi_task

TRAIN = {"steps": 4, "lr": 0.01, "rank": 4, "batch_size": 8, "save_every": 0, "target_modules": ["q_proj", "v_proj"]}


def _register(monkeypatch: pytest.MonkeyPatch, *tasks: Task) -> None:
    import expertkit.tasks  # noqa: F401 - registers built-ins first

    for task in tasks:
        monkeypatch.setitem(TASKS._entries, task.name, Entry(task.name, task, summary="toy"))


def _sleepy_build(pidfile: str, split: str, n: int, seed: int) -> list:
    """lo-hi examples; the first call anywhere writes its pid and sleeps (the test kills it)."""
    path = Path(pidfile)
    if not path.exists():
        path.write_text(str(os.getpid()))
        time.sleep(120)
    return _lohi_build(split, n, seed)


def _broken_build(split: str, n: int, seed: int) -> list:
    raise RuntimeError("broken task: its generator has no examples")


def _config(tmp_path: Path, model: Path, tasks: list[str], *, name: str, evaluate: bool = True, zoo: bool = False,
            **executor) -> dict:
    stages = [{"kind": "train_experts", "tasks": tasks, "train": TRAIN}]
    if evaluate:
        stages.append({"kind": "evaluate", "n": 12, "batch_size": 12})
    if zoo:  # one cluster of the experts: its candidates are jobs
        stages.append({"kind": "zoo", "n": 6, "budget": 4, "threshold": 10, "mixture": "none", "build": False})
    return {"name": name, "model": str(model), "output_dir": str(tmp_path / "runs"), "seed": 3,
            "stages": stages, **({"executor": executor} if executor else {})}


def test_run_folder_check(tmp_path):
    token = write_marker(tmp_path)
    check_marker(tmp_path, token)
    with pytest.raises(SharedFolderError, match="sees a different run folder"):
        check_marker(tmp_path, "f" * 16)
    with pytest.raises(SharedFolderError, match="sees no run folder"):
        check_marker(tmp_path / "missing", token)


def _model_name(loaded, *, suffix: str) -> str:
    print("working on", loaded.name)
    return loaded.name + suffix


def _fails(loaded) -> None:
    raise ValueError("no luck")


def test_the_worker_body_checks_the_folder_logs_and_returns(tmp_path, tiny_checkpoint):
    """What a Ray task runs, called here in-process (no Ray): marker check, log, result, traceback."""
    from expertkit.pipeline.ray_executor import run_job

    model = str(tiny_checkpoint("llama"))
    token, log = write_marker(tmp_path), tmp_path / "job.log"
    assert run_job(Job("a", _model_name, model, {"suffix": "!"}), model, str(tmp_path), token, str(log), 2, 3) \
        == Path(model).name + "!"
    with pytest.raises(ValueError, match="no luck"):
        run_job(Job("b", _fails, model), model, str(tmp_path), token, str(log), 3, 3)
    text = log.read_text()
    assert "=== a: attempt 2/3 on" in text and f"working on {Path(model).name}" in text and "=== finished" in text
    assert "=== b: attempt 3/3" in text and 'raise ValueError("no luck")' in text
    with pytest.raises(SharedFolderError):
        run_job(Job("c", _fails, model), model, str(tmp_path / "elsewhere"), token, str(log), 1, 3)


def test_executor_section_and_cli_options_are_validated(tmp_path, cli):
    with pytest.raises(ConfigError) as info:
        parse_run_config({"name": "x", "executor": {"kind": "rey", "max_retris": 1},
                          "stages": [{"kind": "inspect"}]})
    assert "executor.kind" in str(info.value) and "Did you mean 'max_retries'?" in str(info.value)
    config = tmp_path / "run.yaml"
    config.write_text("name: x\nstages:\n  - kind: inspect\n")
    code, _, err = cli(["run", str(config), "--executor", "rey"])
    assert code == 2 and "executor" in err and "Traceback" not in err


def test_ray_gives_the_in_process_results(local_ray, tmp_path, tiny_checkpoint, monkeypatch):
    _register(monkeypatch, lohi_task(), copy_task())
    model = tiny_checkpoint("llama")
    tasks = ["lo-hi", "copy-char"]
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache-local"))
    here = run_pipeline(parse_run_config(_config(tmp_path, model, tasks, name="here", zoo=True)))
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache-ray"))  # no evaluation reused from the first run
    there = run_pipeline(parse_run_config(_config(tmp_path, model, tasks, name="there", zoo=True, kind="ray")))
    from safetensors import safe_open

    for task in tasks:  # the same tensors bit for bit and the same metadata (safetensors writes its
        files = [safe_open(d / "experts" / task / "adapter_model.safetensors", "pt") for d in (here, there)]
        assert files[0].metadata() == files[1].metadata()  # header in a per-process order, so not the bytes)
        assert sorted(files[0].keys()) == sorted(files[1].keys()) and len(files[0].keys()) == 8
        for name in files[0].keys():
            a, b = files[0].get_tensor(name), files[1].get_tensor(name)
            assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))
    res = [json.loads((d / "results.json").read_text())["stages"] for d in (here, there)]
    assert res[0]["evaluate"]["result"]["matrix"] == res[1]["evaluate"]["result"]["matrix"]
    assert set(res[1]["evaluate"]["result"]["matrix"]) == {"base", "expert:lo-hi", "expert:copy-char"}
    for stage in ("train_experts", "evaluate", "zoo"):
        assert res[0][stage]["key"] == res[1][stage]["key"]
    # the zoo stage's candidates ran in Ray's workers and gave the in-process plan
    from expertkit.merge.zoo import load_plan

    plans = [load_plan(d / "zoo" / "main" / "plan.yaml") for d in (here, there)]
    assert plans[1].model_copy(update={"members": plans[0].members}) == plans[0]  # member paths name the runs
    assert [m.name for m in plans[1].members] == tasks and len(plans[1].clusters[0].trials) > len(tasks)
    assert list((there / "stages" / "02-zoo" / "logs").glob("candidate_*.log"))
    assert list((tmp_path / "cache-ray" / "eval").rglob("*.json"))  # Ray's workers wrote the eval cache
    log = (there / "stages" / "00-train_experts" / "logs" / "expert_lo-hi.log").read_text()
    assert "=== expert:lo-hi: attempt 1/3" in log and "=== finished" in log
    assert (there / "stages" / "01-evaluate" / "logs" / "base_copy-char.log").exists()
    tables = [[line.rsplit("|", 2)[0] for line in (d / "report.md").read_text().splitlines() if line.startswith("| ")]
              for d in (here, there)]  # the tables less their last column (the experts' seconds differ)
    assert tables[0] == tables[1] and any("| lo-hi | lo-hi | 4 |" in line for line in tables[0])


def test_a_killed_worker_is_retried_and_the_run_completes(local_ray, tmp_path, tiny_checkpoint, monkeypatch):
    pidfile = tmp_path / "pid"
    sleepy = Task("sleepy", "toy", "choice", "test", "MIT", "lo-hi, slow once",
                  functools.partial(_sleepy_build, str(pidfile)), exact)
    _register(monkeypatch, sleepy)
    killed: list[int] = []

    def killer() -> None:
        for _ in range(1200):
            if pidfile.exists() and pidfile.read_text():
                killed.append(int(pidfile.read_text()))
                os.kill(killed[0], signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    run_dir = run_pipeline(parse_run_config(
        _config(tmp_path, tiny_checkpoint("llama"), ["sleepy"], name="kill", evaluate=False, kind="ray")))
    thread.join(5)
    assert killed and killed[0] != os.getpid()
    assert (run_dir / "experts" / "sleepy" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (run_dir / "experts").iterdir()) == ["sleepy"]  # no temporary leftovers
    log = (run_dir / "stages" / "00-train_experts" / "logs" / "expert_sleepy.log").read_text()
    assert "attempt 1/3 on" in log and f"pid {killed[0]}" in log
    assert "attempt 1/3 failed: the worker running it died" in log
    assert "attempt 2/3" in log and log.rstrip().splitlines()[-1].startswith("=== finished")


def test_a_job_failing_every_retry_fails_the_stage_and_keeps_the_others(local_ray, tmp_path, tiny_checkpoint,
                                                                         monkeypatch):
    broken = Task("broken", "toy", "choice", "test", "MIT", "always fails", _broken_build, exact)
    _register(monkeypatch, lohi_task(), broken)
    model = tiny_checkpoint("llama")
    with pytest.raises(JobFailedError) as info:
        run_pipeline(parse_run_config(_config(tmp_path, model, ["lo-hi", "broken"], name="fail", evaluate=False,
                                              kind="ray", max_retries=1)))
    msg = str(info.value)
    assert "job 'expert:broken' failed after 2 attempts: RuntimeError: broken task: its generator has no examples" in msg
    assert "the 1 other job(s) finished and are kept" in msg
    kept = tmp_path / "runs" / "fail" / "experts" / "lo-hi" / "adapter_model.safetensors"
    before = kept.stat().st_mtime_ns, kept.read_bytes()
    assert not (tmp_path / "runs" / "fail" / "experts" / "broken").exists()
    assert not (tmp_path / "runs" / "fail" / "stages" / "00-train_experts" / "result.json").exists()
    log = (tmp_path / "runs" / "fail" / "stages" / "00-train_experts" / "logs" / "expert_broken.log").read_text()
    assert log.count("RuntimeError: broken task") == 4  # two tracebacks, two driver notes
    # a rerun (here in-process, without the broken task) reuses the kept expert instead of training it again
    run_pipeline(parse_run_config(_config(tmp_path, model, ["lo-hi"], name="fail", evaluate=False)))
    assert (kept.stat().st_mtime_ns, kept.read_bytes()) == before


def test_a_worker_that_cannot_see_the_run_folder_fails_clearly_without_retries(local_ray, tmp_path, tiny_checkpoint,
                                                                                 monkeypatch):
    import expertkit.pipeline.ray_executor as rx

    def elsewhere(run_dir: Path) -> str:  # the driver's token differs from what the workers find there
        write_marker(run_dir)
        return "0" * 16

    monkeypatch.setattr(rx, "write_marker", elsewhere)
    executor = rx.RayExecutor(ExecutorConfig(kind="ray", max_retries=3), tmp_path, str(tiny_checkpoint("llama")))
    with pytest.raises(JobFailedError) as info:
        executor.map("evaluate", [Job("cell", len, str(tiny_checkpoint("llama")))], tmp_path / "logs")
    assert "job 'cell' failed after 1 attempt: SharedFolderError: worker on host" in str(info.value)
    assert "must be on a path every node of the Ray cluster reaches" in str(info.value)
