"""experiments/glider.py --smoke: the whole experiment on a tiny random llama with two experts; its cells
(run on the sweep executor) hold the scores of the direct per-cell loop the script ran before."""

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
    choice = res["expert_instructions"]  # chosen on validation top-1 over the whole grid; GLIDER's cells use it
    assert set(choice["validation"]) == {"0", "5", "10", "20"}
    assert choice["validation"][str(choice["chosen"])] == max(choice["validation"].values())
    glider_cell = json.loads((tmp_path / "run" / "cells" / "glider-gcd.json").read_text())
    arrow_cell = json.loads((tmp_path / "run" / "cells" / "arrow-gcd.json").read_text())
    assert glider_cell["key"]["config"]["expert_instructions"] == choice["chosen"]
    assert arrow_cell["key"]["config"]["expert_instructions"] == 5  # the default: the others do not read it
    out = capsys.readouterr().out
    assert "| glider |" in out and "Global router top-1 retrieval" in out
    # a second run finds every (method, task) cell and recomputes none of them
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").glob("*.json")}
    assert len(stamps) == 3 * 3 + 2  # glider, arrow, base on 3 tasks; oracle on the 2 held-in ones
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((tmp_path / "run" / "results.json").read_text())["scores"] == res["scores"]
    # --save-kept packs cells and instructions; a run into a fresh folder restores them and recomputes nothing
    kept = tmp_path / "kept"
    monkeypatch.setattr(sys, "argv", ["glider.py", "--smoke", "--out", str(tmp_path / "run"), "--kept", str(kept),
                                      "--save-kept"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert len(list((kept / "cells").glob("*.json"))) == len(stamps) and (kept / "instructions.jsonl").stat().st_size
    monkeypatch.setattr(sys, "argv", ["glider.py", "--smoke", "--n", "2", "--out", str(tmp_path / "run2"),
                                      "--kept", str(kept), "--methods", "glider", "arrow", "oracle", "base"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    restored = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run2" / "cells").glob("*.json")}
    assert restored == {p.name: p.stat().st_mtime_ns for p in (kept / "cells").glob("*.json")}  # none recomputed
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["scores"] == res["scores"]


def _direct_cells(run: Path, library_root: str) -> dict[str, dict]:
    """Every cell of the smoke run above as the script computed it before its cells ran on an executor:
    one loop in this process over tasks and methods, one embedder and one instruction writer (here with
    an empty instruction cache, so the instructions are written again)."""
    from expertkit.models import load_model
    from expertkit.models.embedder import HashEmbedder
    from expertkit.route import ExpertLibrary, InstructionWriter, RouteConfig
    from expertkit.route.api import make_router
    from expertkit.route.evaluate import evaluate_router
    from expertkit.tasks.base import get_task

    loaded = load_model(str(run / "tiny"))
    library = ExpertLibrary.load(library_root)
    embedder = HashEmbedder()
    writer = InstructionWriter(loaded, cache_dir=run.parent / "fresh-instructions", max_new_tokens=4,
                               template="Input: {query}\nTask:", max_query_chars=60)
    held_in = ["reverse_words", "leap_year"]
    cells = {}
    for name in [*held_in, "gcd"]:
        task = get_task(name)
        examples = task.examples("test", 2, 0)
        for method in ("glider", "arrow", "oracle", "base"):
            if method == "oracle" and name not in held_in:
                continue
            cfg = RouteConfig(method=method, top_k=2, alpha="held_in" if name in held_in else "held_out", seed=0)
            router = make_router(loaded, library, cfg, embedder=embedder, writer=writer)
            cells[f"{method}-{name}.json"] = {
                "key": {"library": library.digest(), "config": cfg.model_dump(mode="json"), "task": name, "n": 2},
                "scores": [r.score for r in evaluate_router(router, task, examples, batch_size=16)]}
    return cells


def test_experiment_local_executor_cells_equal_the_direct_loop(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["glider.py", "--smoke", "--n", "2", "--out", str(run), "--executor", "local",
                                      "--methods", "glider", "arrow", "oracle", "base", "--expert-instructions", "5"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    library_root = json.loads((run / "results.json").read_text())["library"]
    want = _direct_cells(run, library_root)
    got = {p.name: json.loads(p.read_text()) for p in (run / "cells").glob("*.json")}
    assert len(want) == 11 and got == want
    assert len({tuple(c["scores"]) for c in want.values()}) > 1  # the cells differ: a mix-up would show
