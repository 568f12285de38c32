"""The ``zoo`` stage: the plan of ``plan_zoo`` on the run's experts (and listed members), written and
built in the run folder, candidates scored on the run's executor, reused on rerun, clear errors.

A tiny Llama gets two LoRA experts on the toy tasks lo-hi and copy-char (a few steps each); a copy of
the lo-hi expert outside the run is listed as an extra member, and ``threshold: 10`` puts the three in
one cluster, so the strategy search really runs (members alone, greedy steps, the grid under the budget).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from expertkit.errors import ConfigError
from expertkit.merge.zoo import load_plan, plan_zoo
from expertkit.pipeline import parse_run_config, run_pipeline
from expertkit.pipeline.executor import LocalExecutor
from expertkit.registry import Entry
from expertkit.tasks.base import TASKS
from expertkit.tasks.toy import copy_task, lohi_task

DOCS = Path(__file__).resolve().parents[2] / "docs"
TRAIN = {"steps": 4, "lr": 0.01, "rank": 4, "batch_size": 8, "save_every": 0, "target_modules": ["q_proj", "v_proj"]}
ZOO = {"kind": "zoo", "n": 6, "budget": 5, "threshold": 10, "mixture": "none"}


@pytest.fixture
def toy_tasks(monkeypatch):
    """lo-hi and copy-char, registered for one test."""
    import expertkit.tasks  # noqa: F401 - registers the built-ins first

    for task in (lohi_task(), copy_task()):
        monkeypatch.setitem(TASKS._entries, task.name, Entry(task.name, task, summary="toy"))


class Recording(LocalExecutor):
    """The local executor, noting each batch it is given."""

    def __init__(self, models):
        super().__init__(models)
        self.batches: list[tuple[str, list[str], Path]] = []

    def map(self, stage, jobs, log_dir):
        self.batches.append((stage, [j.key for j in jobs], log_dir))
        return super().map(stage, jobs, log_dir)


def _run(tmp_path, model, *zoo):
    return {"name": "z", "model": str(model), "output_dir": str(tmp_path / "runs"), "seed": 3,
            "stages": [{"kind": "train_experts", "tasks": ["lo-hi", "copy-char"], "train": TRAIN}, *zoo]}


def test_the_stage_plans_as_plan_zoo_on_the_run_executor_builds_and_is_reused(tmp_path, tiny_checkpoint, toy_tasks,
                                                                               monkeypatch):
    import expertkit.pipeline.run as run_module

    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    model = tiny_checkpoint("llama")
    # the extra member: a copy of the lo-hi expert, made by the run's first stage alone (reused below)
    first = run_pipeline(parse_run_config(_run(tmp_path, model)))
    extra = tmp_path / "zoo" / "lohi-copy"
    shutil.copytree(first / "experts" / "lo-hi", extra)
    made: list[Recording] = []

    def recording(config, models, run_dir):
        made.append(Recording(models))
        return made[-1]

    monkeypatch.setattr(run_module, "make_executor", recording)
    run_dir = run_pipeline(parse_run_config(_run(tmp_path, model, {**ZOO, "members": [str(extra)]})))
    experts = [run_dir / "experts" / t for t in ("lo-hi", "copy-char")]
    expected = plan_zoo([*experts, extra], ["lo-hi", "copy-char"], n=6, budget=5, threshold=10, mixture="none",
                        seed=3, progress=False)  # in process, with the planner's own evaluator
    out = run_dir / "zoo" / "main"
    assert load_plan(out / "plan.yaml") == expected
    [cluster] = expected.clusters
    assert cluster.members == ["lo-hi", "copy-char", "lohi-copy"] and cluster.tasks == ["lo-hi", "copy-char"]
    scored = [t for t in cluster.trials if "= skipped" not in t]
    assert len(scored) > 3 and any(t.endswith("[skipped: budget]") for t in cluster.trials)  # cut at the budget
    # every candidate was a job of the run's executor, logged in the stage's folder
    batches = made[0].batches  # the experts were trained by the first run and reused
    assert batches and all(stage == "zoo plan" and log == run_dir / "stages" / "01-zoo" / "logs"
                           for stage, _, log in batches)
    assert all(k.startswith("candidate:") for _, keys, _ in batches for k in keys)
    assert list((run_dir / "stages" / "01-zoo" / "candidates").iterdir()) == []  # their files are removed
    # built: the cluster's representative, and the result and report say what was chosen
    assert (out / "clusters" / "cluster0" / "model.safetensors").is_file()
    assert json.loads((out / "build.json").read_text())["clusters"]["cluster0"]["method"] == cluster.method
    result = json.loads((run_dir / "results.json").read_text())["stages"]["zoo"]["result"]
    assert result["plan"] == "zoo/main/plan.yaml" and result["built"] is True and result["mixture"] == "none"
    assert [(c["method"], c["merged"], c["score"]) for c in result["clusters"]] == \
        [(cluster.method, cluster.merged, cluster.score)]
    assert f"| cluster0 | lo-hi, copy-char, lohi-copy | {', '.join(cluster.merged)} | {cluster.method}" in \
        (run_dir / "report.md").read_text()
    # a rerun reuses the stage: nothing is planned again
    monkeypatch.setattr(type(run_module.STAGES.get("zoo")), "run", lambda *a: pytest.fail("the stage ran again"))
    run_pipeline(parse_run_config(_run(tmp_path, model, {**ZOO, "members": [str(extra)]})))


def test_a_zoo_without_members_and_bad_params_are_refused_in_one_line(tmp_path, tiny_checkpoint):
    run = {"name": "z", "model": str(tiny_checkpoint("llama")), "output_dir": str(tmp_path / "runs"),
           "stages": [{"kind": "zoo", "tasks": ["leg_count"]}]}
    with pytest.raises(ConfigError) as info:
        run_pipeline(parse_run_config(run))
    assert str(info.value) == ("zoo: no zoo members: the run has no experts and the stage lists no members; add a "
                               "train_experts stage before it or list members: (model folders or LoRA adapters).")
    with pytest.raises(ConfigError) as info:
        parse_run_config({**run, "stages": [{"kind": "zoo", "serach": "cmaes", "budget": 0, "group": "mpl",
                                             "threshold": "far", "mixture": "moe", "tasks": []}]})
    msg = str(info.value)
    assert "6 problems" in msg
    assert "stages[0].tasks" in msg and "at least 1 item" in msg
    assert "stages[0].serach: unknown key 'serach'. Did you mean 'search'?" in msg
    assert "stages[0].budget" in msg and "greater than or equal to 1" in msg
    assert "unknown tensor group 'mpl'. Did you mean 'mlp'?" in msg
    assert "threshold must be 'auto' or a number, got 'far'" in msg
    assert "stages[0].mixture" in msg and "'ffn', 'model' or 'none'" in msg


def test_the_docs_zoo_stage_example_is_a_valid_run_config():
    text = (DOCS / "zoo.md").read_text()
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "kind: zoo" in b]
    run = parse_run_config(yaml.safe_load(block))
    zoo = next(s for s in run.stages if s.kind == "zoo")
    assert zoo.params.build is True and zoo.params.budget == 8
