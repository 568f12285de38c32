"""Run configs: validation of a whole file at once, and resuming an interrupted run."""

from __future__ import annotations

import json
from typing import Any

import pytest

from expertkit.config import Config
from expertkit.errors import ConfigError
from expertkit.pipeline import STAGES, parse_run_config, run_pipeline
from expertkit.registry import Entry


class CountParams(Config):
    value: int = 1
    fail: bool = False


class CountStage:
    """Records each call; raises KeyboardInterrupt when told to (a user's Ctrl-C)."""

    calls: list[int] = []

    def run(self, ctx: Any, params: CountParams) -> dict[str, Any]:
        if params.fail and not ctx.run_dir.joinpath("allow").exists():
            raise KeyboardInterrupt
        self.calls.append(params.value)
        return {"value": params.value * 2}

    def report(self, result: dict[str, Any]) -> str:
        return f"value {result['value']}"


@pytest.fixture
def count_stage(monkeypatch):
    stage = CountStage()
    stage.calls = []
    monkeypatch.setitem(STAGES._entries, "count", Entry("count", stage, summary="test", params=CountParams))
    return stage


def test_validate_reports_every_problem_at_once(count_stage):
    data = {"name": "r", "modle": "x", "stages": [{"kind": "count", "valeu": 2}, {"kind": "cuont"}, {}]}
    with pytest.raises(ConfigError) as info:
        parse_run_config(data, source="run.yaml")
    msg = str(info.value)
    assert msg.startswith("run.yaml: 4 problems")
    assert "unknown key 'modle'. Did you mean 'model'?" in msg
    assert "stages[0].valeu: unknown key 'valeu'. Did you mean 'value'?" in msg
    assert "stages[1].kind: unknown stage 'cuont'. Did you mean 'count'?" in msg
    assert "stages[2]: required field 'kind' is missing" in msg


def test_missing_name_and_duplicate_stage_names(count_stage):
    with pytest.raises(ConfigError) as info:
        parse_run_config({"stages": [{"kind": "count"}, {"kind": "count"}]})
    msg = str(info.value)
    assert "name: required field is missing" in msg
    assert "stage name 'count' is used twice" in msg


def test_interrupted_run_resumes(tmp_path, count_stage):
    data = {"name": "r", "model": str(tmp_path), "output_dir": str(tmp_path),
            "stages": [{"kind": "count", "name": "a", "value": 3}, {"kind": "count", "name": "b", "fail": True}]}
    run = parse_run_config(data)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(run)
    assert count_stage.calls == [3]
    saved = json.loads((tmp_path / "r" / "stages" / "00-a" / "result.json").read_text())
    assert saved["result"] == {"value": 6}
    assert not (tmp_path / "r" / "stages" / "01-b").exists()
    assert not (tmp_path / "r" / "report.md").exists()

    (tmp_path / "r" / "allow").touch()
    run_dir = run_pipeline(run)
    assert count_stage.calls == [3, 1]  # stage a was reused, not run again
    report = (run_dir / "report.md").read_text()
    assert "value 6" in report and "value 2" in report
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stages"]["b"]["result"] == {"value": 2}


def test_changed_params_rerun_the_stage(tmp_path, count_stage):
    base = {"name": "r", "model": str(tmp_path), "output_dir": str(tmp_path)}
    run_pipeline(parse_run_config({**base, "stages": [{"kind": "count", "value": 1}]}))
    run_pipeline(parse_run_config({**base, "stages": [{"kind": "count", "value": 1}]}))
    run_pipeline(parse_run_config({**base, "stages": [{"kind": "count", "value": 5}]}))
    assert count_stage.calls == [1, 5]


def test_unknown_model_named_at_validation(count_stage):
    with pytest.raises(ConfigError) as info:
        parse_run_config({"name": "r", "model": "smollm2-35m", "stages": [{"kind": "count"}]})
    assert "model: unknown model 'smollm2-35m'. Did you mean 'smollm2-135m'?" in str(info.value)
