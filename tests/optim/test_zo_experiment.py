"""experiments/zo_bench.py --smoke: its cells on a tiny random Llama and a toy task, resumed from their files."""

from __future__ import annotations

import json

from tests.scripts import load_script


def test_smoke_run_writes_one_file_per_cell_and_a_rerun_reuses_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    from expertkit.tasks.base import TASKS

    monkeypatch.setattr(TASKS, "_entries", dict(TASKS._entries))  # the smoke run registers its toy task
    exp = load_script("experiments/zo_bench.py")
    out = tmp_path / "run"
    args = ["--smoke", "--out", str(out), "--methods", "zo-sgd"]
    res = exp.main(args)
    rows = res["tasks"]["lo-hi"]
    assert list(rows) == ["zero-shot", "zo-sgd"] and rows["zo-sgd"]["steps"] == 2 and rows["zo-sgd"]["forwards"] == 4
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["lo-hi-zero-shot.json", "lo-hi-zo-sgd.json"]
    saved = json.loads((out / "cells" / "lo-hi-zo-sgd.json").read_text())
    assert saved["settings"] == exp.settings("zo-sgd", 4, 4, 6) and saved["accuracy"] == rows["zo-sgd"]["accuracy"]
    assert (out / "lo-hi" / "zo-sgd" / "expertkit.json").is_file()
    assert "| zo-sgd | 2 | " in capsys.readouterr().out
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    again = exp.main([*args, "--only-finished"])  # nothing trained again: the cells' files are read back
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps  # not rewritten
    assert again["tasks"] == res["tasks"]
    assert json.loads((out / "results.json").read_text())["tasks"] == res["tasks"]
