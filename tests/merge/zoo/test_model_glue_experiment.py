"""experiments/model_glue.py: the smoke run end to end (results, paired tests recomputed from the stored
per-example scores, a rerun that evaluates nothing), choices made on validation, family B reused from
``--b-from``, bad input refused in one line, and the planner's jobs on the sweep executor."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from expertkit.merge.zoo import plan_zoo
from expertkit.tasks.paired import compare, verdict

from tests.scripts import load_script


@pytest.fixture(scope="module")
def exp():
    return load_script("experiments/model_glue.py")


@pytest.fixture(scope="module")
def smoke(exp, tmp_path_factory):
    """One smoke run (a tiny random llama: 3 family-A experts, 2 family-B ones on an evolved copy)."""
    root = tmp_path_factory.mktemp("glue")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXPERTKIT_CACHE", str(root / "cache"))
        res = exp.main(["--smoke", "--out", str(root / "run")])
    return root / "run", res


def test_make_plan_on_the_local_executor_equals_the_in_process_plan(exp, tiny_zoo, tmp_path):
    members = [tiny_zoo["a0"], tiny_zoo["a1"], tiny_zoo["a2"]]
    args = argparse.Namespace(out=tmp_path / "glue", val_n=2, budget=6, group="all", search="grid", seed=0,
                              executor="local", address=None, cpus_per_cell=1.0)
    jobs = exp.make_plan(args, members, ["family_relation"])
    here = plan_zoo(members, ["family_relation"], group="all", n=2, budget=6, mixture="ffn", search="grid",
                    progress=False)
    assert jobs == here and len(here.clusters) == 1 and len(here.clusters[0].trials) == 3 + 2 + 7
    assert list((tmp_path / "glue" / "plan-jobs" / "candidates").iterdir()) == []  # removed once scored
    assert len(list((tmp_path / "glue" / "eval-cache").glob("eval-*.json"))) == 6  # one per evaluated candidate


def test_smoke_run_scores_every_system_on_the_same_examples(exp, smoke):
    out, res = smoke
    tasks = res["tasks"]
    assert tasks == exp.SMOKE_A and res["n"] == 6 and res["val_n"] == 4
    members = [z["system"] for z in res["zoo"]]
    assert members == ["A:family_relation", "A:reverse_words", "A:gcd", "B:family_relation", "B:reverse_words"]
    assert {z["family"] for z in res["zoo"]} == {"A", "B"}
    assert all(Path(z["adapter"], "adapter_config.json").is_file() for z in res["zoo"])
    assert len({z["base"] for z in res["zoo"]}) == 2
    test, val = res["scores"]["test"], res["scores"]["validation"]
    reps = [c["system"] for c in res["plan"]["clusters"]]
    assert len(reps) == 2 and res["plan"]["mixture"] == "ffn"  # one cluster per base: the FFN mixture is built
    expected = {*members, *reps, "base A (zero-shot)", "base B, evolved (zero-shot)", "uniform merge (linear, all 5)",
                "FFN mixture (Mixtral, top-1)", "model-level mixture (MiniLM router)", "oracle"}
    assert set(test) == expected and set(res["accuracy"]) == expected
    assert {len(test[s][t]) for s in test for t in tasks} == {6}  # the same n for every system and task
    assert set(val) == {*members, *reps} and {len(val[s][t]) for s in val for t in tasks} == {4}
    assert sum(res["routed"]["gcd"].values()) == 6
    assert json.loads((out / "results.json").read_text()) == res
    assert (out / "model_glue.png").stat().st_size > 1000
    assert len(res["verdicts"]) == len(reps) + 5
    assert res["verdicts"][len(reps)].startswith("the planner's best cluster (planner cluster")


def test_paired_numbers_are_compare_on_the_stored_scores(exp, smoke):
    """Recompute every choice and every paired test from the per-example scores in results.json."""
    _, res = smoke
    tasks, test, val = res["tasks"], res["scores"]["test"], res["scores"]["validation"]
    members = [z["system"] for z in res["zoo"]]
    best = res["best_single"]["system"]
    assert best == exp.best_single(val, members, tasks)
    choice = res["oracle"]["choice"]
    assert choice == exp.oracle_choice(val, members, tasks)
    assert test["oracle"] == {t: test[choice[t]][t] for t in tasks}
    assert set(res["paired"]) == set(test) - {best}
    for system, p in res["paired"].items():
        pooled = compare([x for t in tasks for x in test[system][t]], [x for t in tasks for x in test[best][t]],
                         seed=0)
        assert p["pooled"] == pooled.as_dict()  # the same numbers, not merely close
        for t in tasks:
            assert p["per_task"][t] == compare(test[system][t], test[best][t], seed=0).as_dict()
    assert res["paired"]["oracle"]["pooled"]["n"] == 6 * len(tasks)
    uniform = "uniform merge (linear, all 5)"
    pooled = [[x for t in tasks for x in test[s][t]] for s in (uniform, best)]
    line = verdict(f"the uniform merge of all 5 members is more accurate than the best single model ({best}, chosen "
                   "on validation)", compare(*pooled, seed=0))
    assert line in res["verdicts"]


def test_a_rerun_evaluates_nothing_and_a_lost_cell_only_that_cell(exp, smoke, monkeypatch):
    out, res = smoke
    monkeypatch.setenv("EXPERTKIT_CACHE", str(out.parent / "cache"))
    import expertkit.merge.mixture
    import expertkit.tasks

    calls = []
    real = expertkit.tasks.evaluate

    def counted(*args, **kwargs):
        calls.append((args[2], kwargs["split"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(expertkit.tasks, "evaluate", counted)
    monkeypatch.setattr(expertkit.merge.mixture, "evaluate_routed", None)  # the router's cells must not run
    cells = sorted((out / "cells").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cells]
    again = exp.main(["--smoke", "--out", str(out)])
    assert calls == [] and [p.stat().st_mtime_ns for p in cells] == stamps
    assert again["scores"] == res["scores"] and again["verdicts"] == res["verdicts"]
    (out / "cells" / "test" / "A_gcd" / "reverse_words.json").unlink()
    third = exp.main(["--smoke", "--out", str(out)])
    assert calls == [("reverse_words", "test")]
    assert third["scores"] == res["scores"]  # the same examples give the same scores again


def test_best_single_model_and_oracle_are_chosen_on_validation(exp):
    """X leads on validation, Y on test: X is the best single model, and the paired tests are against X."""
    tasks = ["t1", "t2"]
    val = {"X": {"t1": [1, 1, 1, 0], "t2": [1, 0, 0, 0]}, "Y": {"t1": [1, 0, 0, 0], "t2": [1, 1, 0, 0]},
           "Z": {"t1": [1, 1, 1, 0], "t2": [1, 0, 0, 0]}}  # Z ties X: the first in zoo order wins
    test = {"X": {"t1": [0, 0, 1], "t2": [0, 0, 0]}, "Y": {"t1": [1, 1, 1], "t2": [1, 1, 0]},
            "Z": {"t1": [0, 1, 1], "t2": [0, 0, 1]}, "M": {"t1": [1, 1, 1], "t2": [1, 1, 1]}}
    assert exp.best_single(val, ["X", "Y", "Z"], tasks) == "X"
    assert exp.best_single(val, ["Z", "X", "Y"], tasks) == "Z"
    assert exp.oracle_choice(val, ["X", "Y", "Z"], tasks) == {"t1": "X", "t2": "Y"}
    claims = [("M", "M", ""), ("the best cluster", exp.BEST_CLUSTER, ""), ("F", None, "no FFN mixture")]
    res = exp.analyse(test, val, ["X", "Y", "Z"], {"c0": "Y", "c1": "Z"}, claims, tasks, seed=0)
    assert res["best_single"] == {"system": "X", "validation": pytest.approx(0.5)}
    assert res["best_cluster"] == {"system": "Z", "validation": pytest.approx(0.5)}  # Y: 0.375 on validation
    assert res["test"]["oracle"] == {"t1": [0, 0, 1], "t2": [1, 1, 0]}  # X's t1, Y's t2 on test
    assert res["paired"]["Y"]["pooled"]["mean_b"] == pytest.approx(1 / 6)  # against X, not against Y
    assert "X" not in res["paired"] and res["paired"]["M"]["pooled"]["a_only"] == 5
    assert res["verdicts"][0].startswith("M is more accurate than the best single model (X, chosen on validation)")
    assert res["verdicts"][1].startswith("the best cluster (Z, chosen on validation) is more accurate than")
    assert res["verdicts"][2] == ("F is more accurate than the best single model (X, chosen on validation): not run "
                                  "(no FFN mixture).")


def test_family_b_is_read_from_b_from_when_made_there_with_these_settings(exp, smoke, tmp_path, monkeypatch):
    out, res = smoke
    import expertkit.train
    from expertkit.models import load_model

    def no_training(*args, **kwargs):
        raise AssertionError("a finished expert of --b-from was trained again")

    monkeypatch.setattr(expertkit.train, "train_lora", no_training)
    args = exp._args(["--smoke", "--out", str(tmp_path / "other"), "--b-from", str(out / "family-b")])
    base_dir, paths = exp.family_b(args, load_model(out / "tiny-llama"))
    assert base_dir == out / "family-b" / "base-2-0.01"
    assert [str(p) for p in paths] == [z["adapter"] for z in res["zoo"] if z["family"] == "B"]
    assert not (tmp_path / "other" / "family-b").exists()
    folder = paths[0]
    digest = json.loads((folder / "expertkit.json").read_text())["base_digest"]
    fields = json.loads((folder / "expertkit.json").read_text())["config"]
    assert exp._reusable(folder, "family_relation", base_dir, digest, fields)
    assert not exp._reusable(folder, "reverse_words", base_dir, digest, fields)  # another task
    assert not exp._reusable(folder, "family_relation", base_dir, digest, {**fields, "steps": 60})  # other settings
    assert not exp._reusable(folder, "family_relation", out / "tiny-llama", digest, fields)  # another base


def test_bad_input_is_refused_in_one_line_before_any_work(exp, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--val-n must be at least 1, got 0"):
        exp._args(["--val-n", "0", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="holds no evolved base base-60-0.00025/"):
        exp._args(["--b-from", str(tmp_path), "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match=r"--a-tasks \['leap_year'\] have no expert in the GLIDER library"):
        exp._args(["--a-tasks", "family_relation", "leap_year", "--out", str(tmp_path / "c")])
    for level in ("60-1e-4", "0:0"):
        with pytest.raises(SystemExit, match="--b-level is STEPS:LR"):
            exp._args(["--b-level", level, "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit):  # an unknown tensor group: refused by the parser, before any work
        exp._args(["--group", "embeddings", "--out", str(tmp_path / "d")])
    assert "error: argument --group" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="lists a task twice"):
        exp._args(["--b-tasks", "gcd", "gcd", "--out", str(tmp_path / "e")])
    assert not any(tmp_path.iterdir())


def test_a_task_without_examples_in_a_split_is_refused(exp, monkeypatch):
    from expertkit.tasks.base import TASKS, Task
    from expertkit.tasks.toy import exact, lohi_task

    monkeypatch.setattr(TASKS, "_entries", dict(TASKS._entries))
    lohi = lohi_task()
    empty = Task("no-validation", "toy", "choice", "test", "MIT", "no validation split",
                 lambda split, n, seed: [] if split == "validation" else lohi.build(split, n, seed), exact)
    TASKS.add(empty.name, empty, summary="test")
    args = argparse.Namespace(val_n=4, n=6, seed=0)
    with pytest.raises(SystemExit, match="task no-validation gives no examples in the validation split"):
        exp._check_splits(["gcd", "no-validation"], args)
    assert exp._check_splits(["gcd"], args) == {"gcd": {"validation": 4, "test": 6}}
