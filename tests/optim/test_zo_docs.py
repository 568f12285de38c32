"""docs/zo.md's Python example runs as written and trains; a pipeline config can name a ZO optimizer."""

from __future__ import annotations

import re
from pathlib import Path

from expertkit.config import validate
from expertkit.pipeline.stages.experts import TrainExpertsParams

ROOT = Path(__file__).resolve().parents[2]


def test_zo_doc_example_runs_and_lowers_the_loss(capsys) -> None:
    text = (ROOT / "docs" / "zo.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, "docs/zo.md", "exec"), namespace)  # noqa: S102 - our own docs
    losses = namespace["losses"]
    assert losses[-1] < losses[0] - 0.05
    assert "loss" in capsys.readouterr().out


def test_pipeline_stage_accepts_zo_optimizer_with_scheme_defaults() -> None:
    params = validate(TrainExpertsParams, {"tasks": ["leap_year"], "train": {
        "optimizer": "zo-sgd", "scheme": "prefix", "optimizer_params": {"q": 2}}})
    assert params.train.lr == 1e-2 and params.train.optimizer_params == {"eps": 1e-1, "q": 2}
    explicit = validate(TrainExpertsParams, {"tasks": ["leap_year"], "train": {"optimizer": "zo-adam", "lr": 5e-4}})
    assert explicit.train.lr == 5e-4 and explicit.train.optimizer_params == {"eps": 1e-2}
