"""experiments/glider.py --smoke: the whole experiment on a tiny random llama with two experts."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "glider.py"


def test_experiment_smoke_run_scores_every_method_on_the_same_examples(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["glider.py", "--smoke", "--n", "2", "--out", str(tmp_path / "run"),
                                      "--methods", "glider", "arrow", "oracle", "base"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res["scores"]) == {"glider", "arrow", "oracle", "base"}
    assert set(res["scores"]["glider"]) == {"reverse_words", "leap_year", "gcd"}
    assert set(res["scores"]["oracle"]) == {"reverse_words", "leap_year"}  # no oracle on held-out tasks
    assert all(len(s) == 2 for per in res["scores"].values() for s in per.values())
    assert set(res["paired"]["held_in"]) == {"arrow", "oracle", "base"} and set(res["paired"]["held_out"]) == {"arrow", "base"}
    assert res["global_top1"]["n"] == 4 and set(res["goals"]) >= {"held_in_vs_oracle", "global_top1"}
    assert (tmp_path / "run" / "glider.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| glider |" in out and "Global router top-1 retrieval" in out
    # a second run finds every (method, task) cell and recomputes none of them
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").glob("*.json")}
    assert len(stamps) == 3 * 3 + 2  # glider, arrow, base on 3 tasks; oracle on the 2 held-in ones
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((tmp_path / "run" / "results.json").read_text())["scores"] == res["scores"]
