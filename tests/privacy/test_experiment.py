"""experiments/dp_flat.py --smoke: every part of the script on a tiny random Llama and a toy task."""

from __future__ import annotations

import json
import math

from tests.scripts import load_script


def test_smoke_run_pairs_cells_accounts_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    from expertkit.tasks.base import TASKS

    monkeypatch.setattr(TASKS, "_entries", dict(TASKS._entries))  # the smoke run registers its toy task
    exp = load_script("experiments/dp_flat.py")
    out = tmp_path / "run"
    args = ["--smoke", "--out", str(out), "--systems", "dpsgd", "dpflat", "--epsilons", "3"]
    res = exp.main(args)
    cells = {(c["system"], c["target_epsilon"]): c for c in res["cells"]}
    assert set(cells) == {("dpsgd", 3.0), ("dpflat", 3.0)}
    assert 2.9 < cells["dpsgd", 3.0]["epsilon"] <= 3.0
    assert exp.recipe_for(exp._args(["--smoke"]), "dpflat", math.inf).train.optimizer_params["epsilon"] == math.inf
    flat = cells["dpflat", 3.0]
    assert flat["recipe"]["train"]["scheme"] == "prefix" and flat["prefix_layers"] == [
        min(range(2), key=lambda i: flat["layer_sharpness"][i])]
    assert len({len(c["scores"]) for c in res["cells"]} | {len(res["nonprivate"]["scores"])}) == 1  # paired
    assert json.loads((out / "cells" / "nonprivate.json").read_text()) == res["nonprivate"]  # cached like a cell
    assert (out / "accuracy_vs_epsilon.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "DP-Flat beats DP-SGD LoRA at ε = 3" in printed and "Share of the DP-SGD gap closed" in printed
    # dpflat distills: its public-only teacher is scored on the same examples and compared with the student
    assert set(res["teachers"]) == {"dpflat"} and res["teachers"]["dpflat"]["scheme"] == "prefix"
    assert len(res["teachers"]["dpflat"]["scores"]) == len(flat["scores"])
    assert "the DP student (dpflat, ε = 3) beats its public-only teacher" in printed
    # cached cells are reused: a second run trains nothing and gives the same cells
    again = exp.main(args)
    assert [c["wall_seconds"] for c in again["cells"]] == [c["wall_seconds"] for c in res["cells"]]
    assert json.loads((out / "results.json").read_text())["claims"] == res["claims"]
