"""experiments/zo_bench.py: the smoke run end to end (lr chosen on validation, equal forwards and equal wall
time, paired claims), a rerun that reuses every cell, and the pieces that must be exact: a sweep run
resumed to the full budget equals an uninterrupted run; snapshot weights score as the saved adapter does.
Its run machinery (``expertkit.train.validated``) is tested here, on the script's smoke model and task."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from expertkit.train import validated
from tests.scripts import load_script


@pytest.fixture(scope="module")
def exp():
    return load_script("experiments/zo_bench.py")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    from expertkit.tasks.base import TASKS

    monkeypatch.setattr(TASKS, "_entries", dict(TASKS._entries))  # the smoke run registers its toy task


def test_forward_units_and_steps_follow_the_counting_rule(exp):
    units = {m: exp.units_per_step(m, 30) for m in exp.VARIANTS}
    assert units == {"zo-sgd": 2, "zo-adam": 2, "forward-grad": 2, "zo-sgd-block": 60, "zo-sgd-sparse": 2,
                     "zo-sgd-sign": 2, "zo-sgd-cons": 5, "adamw": 3}
    cfg = exp.settings("adamw", 1e-3, 4000, 8, 30, 1487)
    assert cfg["steps"] == 1333 and cfg["save_every"] == 66 and cfg["optimizer_params"] == {}
    cfg = exp.settings("zo-sgd-block", 1e-4, 4000, 8, 30, 1487)
    assert cfg["steps"] == 66 and cfg["optimizer"] == "zo-sgd"
    assert cfg["optimizer_params"] == {"eps": 1e-2, "block": "layer"}
    assert exp.sweep_stop(exp.settings("zo-sgd", 1e-4, 4000, 8, 30, None), 0.25) == 500  # 2000 steps, every 100
    assert exp.sweep_stop({"steps": 12, "save_every": 1}, 0.25) == 3
    assert exp.sweep_stop({"steps": 6, "save_every": 4}, 0.25) == 4  # at least one snapshot in
    assert exp.sweep_stop({"steps": 3, "save_every": 1}, 1.0) == 3


def test_a_run_folder_and_a_cell_name_their_settings_task_and_model(exp, tmp_path):
    import argparse

    args = argparse.Namespace(out=tmp_path, task="bbc_topic", model="smollm2", smoke=False)
    a, b = (exp.settings("zo-sgd", 1e-4, 4000, batch, 30, 1487) for batch in (8, 16))
    assert exp.run_path(args, "zo-sgd", 1e-4, a) == exp.run_path(args, "zo-sgd", 1e-4, dict(a))
    assert exp.run_path(args, "zo-sgd", 1e-4, a) != exp.run_path(args, "zo-sgd", 1e-4, b)  # other --batch
    other = argparse.Namespace(**{**vars(args), "task": "lo-hi"})
    assert exp.run_path(args, "zo-sgd", 1e-4, a) != exp.run_path(other, "zo-sgd", 1e-4, a)
    cells = [exp._cell(x, "zero-shot", exp.zero_shot_cell, {"n_val": 1}) for x in (args, other)]
    assert cells[0].match != cells[1].match  # a result file of another task is not reused


def test_choose_prefers_validation_accuracy_then_the_right_labels_log_probability_then_the_smaller_lr(exp):
    def row(lr, acc, gold):
        return {"lr": lr, "validation": {"accuracy": acc, "gold_lp": gold}}

    rows = [row(1e-4, 0.5, [-1.0]), row(3e-4, 0.6, [-3.0]), row(1e-3, 0.6, [-2.0])]
    assert exp.choose(rows)["lr"] == 1e-3
    assert exp.choose([row(1e-3, 0.6, [-2.0]), row(1e-4, 0.6, [-2.0])])["lr"] == 1e-4


def test_a_best_lr_at_the_grids_edge_is_swept_beyond_on_the_1_3_10_ladder(exp):
    def row(lr, acc):
        return {"lr": lr, "validation": {"accuracy": acc, "gold_lp": [-1.0]}}

    assert [exp.ladder(x, up=True) for x in (1e-4, 3e-4, 1e-3, 3e-5)] == [3e-4, 1e-3, 3e-3, 1e-4]
    assert [exp.ladder(x, up=False) for x in (1e-4, 3e-4, 1e-5, 3e-3)] == [3e-5, 1e-4, 3e-6, 1e-3]
    grid = [row(1e-4, 0.5), row(3e-4, 0.5), row(1e-3, 0.62)]
    assert exp.beyond(grid) == 3e-3  # best at the top
    assert exp.beyond([*grid, row(3e-3, 0.2)]) is None  # the best is inside the lrs tried now
    assert exp.beyond([*grid, row(3e-3, 0.7)]) == 1e-2
    assert exp.beyond([row(1e-5, 0.6), row(3e-5, 0.5), row(1e-4, 0.4)]) == 3e-6  # best at the bottom
    assert exp.beyond([row(1e-4, 0.5), row(3e-4, 0.6), row(1e-3, 0.2)]) is None
    assert exp.beyond([row(1e-4, 0.5)]) is None  # one lr: no edge to tell


def test_smoke_run_chooses_on_validation_pairs_on_test_and_reuses_every_cell(exp, toy, tmp_path, capsys):
    from expertkit.tasks.paired import compare

    out = tmp_path / "run"
    args = ["--smoke", "--out", str(out), "--methods", "zo-sgd", "adamw"]
    res = exp.main(args)
    assert set(res["sweep"]) == {"zo-sgd", "adamw"}
    for m in ("zo-sgd", "adamw"):
        lrs = [r["lr"] for r in res["sweep"][m]]
        assert lrs[:3] == list(exp.grid(m)) and len(lrs) <= 3 + 2  # the grid, then at most --extend beyond it
        for i in range(3, len(lrs)):  # each lr beyond the grid: the best of those before it was at their edge
            assert lrs[i] == exp.beyond(res["sweep"][m][:i])
        assert exp.beyond(res["sweep"][m]) is None or len(lrs) == 5  # it stopped at the inside or at the cap
        assert res["full"][m]["lr"] == exp.choose(res["sweep"][m])["lr"]  # chosen on validation
        assert len(res["full"][m]["test"]["scores"]) == 8 == len(res["zero-shot"]["test"]["scores"])
    assert res["full"]["zo-sgd"]["steps"] == 12 and res["full"]["adamw"]["steps"] == 8  # 24 units: 2 and 3 per step
    limit = res["limit"]
    assert limit == res["full"]["zo-sgd"]["seconds"]  # the first method's full run sets the limit
    for m, w in res["wall"].items():
        full = res["full"][m]
        assert w["limit"] == limit and full["wall_scale"] == 1.0  # resumed from its sweep point: one machine
        if full["seconds"] > limit:  # a checkpoint trained within the limit (step 0: the LoRA start)
            assert w["seconds"] <= limit and 0 <= w["step"] < full["steps"]
            assert len(w["test"]["scores"]) == 8
        else:
            assert {k: v for k, v in w.items() if k != "limit"} == res["chosen"][m]
        chosen, curve = res["chosen"][m], full["curve"]
        assert [c[0] for c in curve] == [0, *range(1, full["steps"] + 1)]  # the start, each checkpoint, the end
        assert chosen["validation"] == max(c[2] for c in curve)  # the best on validation
        assert [chosen["step"], chosen["validation"]] in [c[::2] for c in curve]
        if chosen["step"] == full["steps"]:
            assert chosen["test"] == full["test"]
    assert not list((out / "train").glob("*/lr-*"))  # every run folder deleted once its result was written
    tests = res["claims"]["tests"]
    assert res["claims"]["best_zo"] == "zo-sgd"
    settings = [name for name, _ in exp.SETTINGS]
    assert [(t["a"], t["b"], t["setting"]) for t in tests] == [
        *(("zo-sgd", "zero-shot", x) for x in settings), *(("adamw", "zo-sgd", x) for x in settings)]
    again = compare(res["wall"]["adamw"]["test"]["scores"], res["wall"]["zo-sgd"]["test"]["scores"])
    assert {k: tests[5][k] for k in again.as_dict()} == again.as_dict()
    again = compare(res["chosen"]["zo-sgd"]["test"]["scores"], res["zero-shot"]["test"]["scores"])
    assert {k: tests[1][k] for k in again.as_dict()} == again.as_dict()
    assert json.loads((out / "results.json").read_text())["claims"] == res["claims"]
    assert (out / "zo_bench.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| zo-sgd | " in printed and "AdamW beats the best ZO method on validation (zo-sgd)" in printed
    assert re.search(r"zo-sgd lr-\S+ step 1: mean training loss of steps 1-1 \S+, validation 0\.\d{3}, ", printed)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    swept = sum(len(v) for v in res["sweep"].values())
    assert len(stamps) == 1 + swept + 2
    rerun = exp.main(args)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps  # nothing ran again
    assert rerun["full"] == res["full"] and rerun["claims"] == res["claims"]


def test_a_sweep_run_resumed_to_the_full_budget_equals_an_uninterrupted_run(exp, toy, tmp_path):
    from expertkit.errors import ConfigError
    from expertkit.models import load_model
    from expertkit.tasks.toy import register_smoke_task

    task = exp._task(register_smoke_task(), True)
    loaded = load_model(exp._smoke_model(tmp_path))
    cfg = exp.settings("zo-sgd", 1e-3, 16, 4, 2, None)  # 8 steps, a snapshot every step
    assert validated.train_run(loaded, task, cfg, tmp_path / "a", stop=3) is None  # the sweep point
    assert [s for s, _, _ in validated.snapshots(tmp_path / "a")] == [3]  # the sweep point's weights only
    assert validated.train_run(loaded, task, cfg, tmp_path / "a", stop=3) is None  # reached before: nothing trained
    resumed = validated.train_run(loaded, task, cfg, tmp_path / "a")
    assert resumed.resumed_from == 3
    straight = validated.train_run(loaded, task, cfg, tmp_path / "b")
    assert resumed.losses == straight.losses
    a, b = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _, _ in validated.snapshots(tmp_path / "a")] == [3]
    # snapshot weights are scored as the same weights saved as an adapter
    final = {k.replace(".weight", ".default.weight"): v for k, v in a.items()}  # PEFT saves without the adapter name
    via_snapshot = exp.evaluate_weights(loaded, task, cfg, final, "test", 8)
    via_adapter = exp.evaluate_adapter(loaded, task, tmp_path / "a" / "adapter", "test", 8)
    assert via_snapshot == via_adapter
    start = exp.evaluate_weights(loaded, task, cfg, None, "test", 8)  # the LoRA start is the base model
    assert start == exp.evaluate_adapter(loaded, task, None, "test", 8)
    with pytest.raises(ConfigError, match="not the trainable tensors"):
        exp.evaluate_weights(loaded, task, cfg, dict(list(final.items())[:1]), "test", 8)
    # a sweep point at the last step is the whole run: its adapter is written, not stopped short
    short = exp.settings("zo-sgd", 1e-3, 6, 4, 2, None)  # 3 steps
    assert validated.train_run(loaded, task, short, tmp_path / "c", stop=3).steps == 3
    assert (tmp_path / "c" / "adapter" / "adapter_config.json").is_file()


def test_bad_arguments_get_one_clear_error(exp, toy, tmp_path, capsys):
    from expertkit.errors import ConfigError

    for bad in (["--sweep-frac", "0"], ["--budget", "0"], ["--pool", "0"], ["--methods", "zo-sgd", "zo-sgd"],
                ["--extend", "-1"]):
        with pytest.raises(SystemExit):
            exp._args(["--out", str(tmp_path / "x"), *bad])
        assert "error: --" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="below one step of zo-sgd-block"):
        exp.settings("zo-sgd-block", 1e-4, 59, 8, 30, None)  # 60 units per step
    args = exp._args(["--task", "reverse_words", "--out", str(tmp_path / "g")])
    args.smoke = False
    with pytest.raises(ConfigError, match="needs a choice task"):
        exp._prepare(args)


def test_the_equal_wall_point_is_the_last_checkpoint_within_the_limit(exp, toy, tmp_path):
    from expertkit.errors import ConfigError
    from expertkit.models import load_model
    from expertkit.tasks.toy import register_smoke_task

    task = exp._task(register_smoke_task(), True)
    loaded = load_model(exp._smoke_model(tmp_path))
    cfg = exp.settings("zo-sgd", 1e-3, 16, 4, 2, None)  # 8 steps, a checkpoint after each of steps 1-7
    validated.train_run(loaded, task, cfg, tmp_path / "none", limit=0.0)
    step, seconds, limit, tensors = validated.wall_point(tmp_path / "none")
    assert (step, seconds, limit, tensors) == (0, 0.0, 0.0, None)  # nothing trained within 0 s: the LoRA start
    # a sweep point that knows the limit, resumed to the full run: the wall point is its last checkpoint (7)
    assert validated.train_run(loaded, task, cfg, tmp_path / "all", stop=3, limit=float("inf")) is None
    assert validated.wall_point(tmp_path / "all")[0] == 3
    validated.train_run(loaded, task, cfg, tmp_path / "all", limit=float("inf"))
    step, seconds, _, tensors = validated.wall_point(tmp_path / "all")
    assert step == 7 and seconds > 0
    validated.train_run(loaded, task, cfg, tmp_path / "seven", stop=7)  # the same run stopped at step 7
    (_, _, path), = validated.snapshots(tmp_path / "seven")
    same = load_file(str(path))
    assert tensors.keys() == same.keys() and all(torch.equal(tensors[k], same[k]) for k in same)
    with pytest.raises(ConfigError, match="another limit"):  # the first full run changed: not silently reused
        validated.train_run(loaded, task, cfg, tmp_path / "all", limit=5.0)
    with pytest.raises(ConfigError, match="without the equal-wall limit"):
        validated.train_run(loaded, task, cfg, tmp_path / "seven", limit=5.0)


def test_a_run_on_another_machine_is_timed_on_the_machine_that_set_the_limit(exp, toy, tmp_path):
    """``reference`` (the sweep point's step and seconds): from that step on, the run's seconds are scaled by
    the ratio of the two timings of the same steps, so a faster machine does not buy checkpoints past W."""
    from expertkit.models import load_model
    from expertkit.tasks.toy import register_smoke_task

    past = [{"step": 0, "seconds": 0.0}, {"step": 3, "seconds": 2.0}]
    assert validated.wall_scale(None, past) == 1.0 and validated.wall_scale([3, 4.0], past[:1]) == 1.0  # not timed yet
    assert validated.wall_scale([3, 4.0], past) == 2.0 and validated.wall_scale([3, 4.0], past[:1], 3, 8.0) == 0.5
    assert validated.wall_scale([3, 2.0], past) == 1.0  # resumed from the sweep point: its own seconds
    task = exp._task(register_smoke_task(), True)
    loaded = load_model(exp._smoke_model(tmp_path))
    cfg = exp.settings("zo-sgd", 1e-3, 16, 4, 2, None)  # 8 steps, a checkpoint after each of steps 1-7

    def validate(tensors):  # steps are scored in order, each better: the wall point is the last within W
        return {"accuracy": next(rising), "gold_lp": [-1.0], "scores": [0.0]}

    rising = iter(range(100))

    # the sweep machine took 1e6 s for steps 1-3, and W is just above: here step 3 is the last one within W
    # (its scaled seconds are 1e6 up to rounding; step 4's are 1e6 x its seconds / step 3's, well above)
    validated.train_run(loaded, task, cfg, tmp_path / "slow", limit=1e6 * (1 + 1e-9), validate=validate,
                        reference=[3, 1e6])
    assert validated.wall_point(tmp_path / "slow")[0] == 3
    rising = iter(range(100))
    validated.train_run(loaded, task, cfg, tmp_path / "own", limit=1e6, validate=validate)  # every step within W
    assert validated.wall_point(tmp_path / "own")[0] == 7
    with pytest.raises(ValueError, match="reference needs validate"):
        validated.train_run(loaded, task, cfg, tmp_path / "x", limit=1e6, reference=[3, 1e6])


def test_prune_keeps_only_the_best_sweep_points_run(exp, tmp_path):
    import argparse

    args = argparse.Namespace(out=tmp_path, task="bbc_topic", model="smollm2", budget=4000, batch=8, n_layers=30,
                              pool=1487)
    rows = [{"lr": lr, "validation": {"accuracy": acc, "gold_lp": [-1.0]}}
            for lr, acc in ((1e-4, 0.5), (3e-4, 0.7), (1e-3, 0.6))]
    folders = [exp.run_path(args, "zo-sgd", r["lr"], exp._cfg(args, "zo-sgd", r["lr"])) for r in rows]
    for f in folders:
        (f / "adapter").mkdir(parents=True)
    exp.prune(args, "zo-sgd", rows[:1])  # one point: it is the best
    assert all(f.is_dir() for f in folders)
    exp.prune(args, "zo-sgd", rows)
    assert [f.is_dir() for f in folders] == [False, True, False]


def test_checkpoints_are_chosen_on_validation_without_touching_training(exp, toy, tmp_path):
    """With ``validate``, every checkpoint and the start are scored as they are written; ``best.safetensors``
    holds the best (ties: the earlier), ``wall.safetensors`` the best within the limit; the training run is
    the same as without validation; a folder trained without it is refused."""
    from expertkit.errors import ConfigError
    from expertkit.models import load_model
    from expertkit.tasks.toy import register_smoke_task

    task = exp._task(register_smoke_task(), True)
    loaded = load_model(exp._smoke_model(tmp_path))
    cfg = exp.settings("zo-sgd", 1e-3, 16, 4, 2, None)  # 8 steps, a checkpoint after each of steps 1-7
    accuracy = iter([0.2, 0.5, 0.3, 0.9, 0.1, 0.9, 0.4, 0.6])  # steps 0-7 in order: step 3 best (5 ties, later)
    seen: list = []

    def validate(tensors):
        seen.append(tensors)
        torch.rand(3)  # a validation that draws random numbers does not move training's stream
        return {"accuracy": next(accuracy), "gold_lp": [-1.0], "scores": [0.0]}

    run = tmp_path / "v"
    assert validated.train_run(loaded, task, cfg, run, stop=3, limit=float("inf"), validate=validate) is None
    assert [e["step"] for e in validated.history(run)] == [0, 1, 2, 3] and seen[0] is None  # the start: no tensors
    checked = validated.train_run(loaded, task, cfg, run, limit=float("inf"), validate=validate)
    assert [e["step"] for e in validated.history(run)] == list(range(8)) and len(seen) == 8  # each one once
    plain = validated.train_run(loaded, task, cfg, tmp_path / "plain")
    assert checked.losses == plain.losses
    step, _, tensors = validated.best_point(run)
    assert step == 3 and validated.wall_point(run)[0] == 3
    validated.train_run(loaded, task, cfg, tmp_path / "three", stop=3)
    (_, _, path), = validated.snapshots(tmp_path / "three")
    same = load_file(str(path))
    assert tensors.keys() == same.keys() and all(torch.equal(tensors[k], same[k]) for k in same)
    accuracy = iter([0.5, 0.1, 0.2])
    validated.train_run(loaded, task, cfg, tmp_path / "zero", stop=2, limit=0.0, validate=validate)
    zero = tmp_path / "zero"
    assert validated.wall_point(zero)[0] == 0 and validated.best_point(zero)[0] == 0  # the start
    validated.train_run(loaded, task, cfg, tmp_path / "old", stop=2)
    with pytest.raises(ConfigError, match="without validating its checkpoints"):
        validated.train_run(loaded, task, cfg, tmp_path / "old", validate=validate)


def test_a_run_whose_loss_went_nan_is_named_with_its_first_bad_step(exp):
    nan, inf = float("nan"), float("inf")
    res = {"full": {"zo-sgd": {"losses": [3.0, 2.0, 1.0]}, "forward-grad": {"losses": [3.0, 9.0, inf, nan, nan]},
                    "zo-adam": {"losses": [3.0, None, 1.0]}}}
    assert exp.nonfinite(res) == {"forward-grad": 3, "zo-adam": 2}  # steps count from 1
    assert exp.nonfinite({"full": {"adamw": {"losses": [1.0]}}}) == {}
    acc = {"accuracy": 0.5}
    point = {"step": 1, "validation": 0.5, "test": acc}
    full = {"lr": 1e-4, "steps": 2, "seconds": 1.0, "validation": acc, "test": acc}
    res = {"zero-shot": {"validation": acc, "test": acc}, "limit": 1.0, "claims": {"best_zo": "zo-sgd", "tests": []},
           "full": {"zo-sgd": {**full, "losses": [1.0, 2.0]}, "forward-grad": {**full, "losses": [1.0, nan]}},
           "chosen": {"zo-sgd": point, "forward-grad": point}, "wall": {"zo-sgd": point, "forward-grad": point},
           "sweep": {m: [{"lr": 1e-4, "step": 1, "validation": acc}] for m in ("zo-sgd", "forward-grad")}}
    text = exp.markdown(res, SimpleNamespace(n_layers=2, n_val=8, sweep_frac=0.25))
    [line] = [x for x in text.splitlines() if "not finite" in x]  # one line, naming only the run that went NaN
    assert "first at step 2: forward-grad." in line and "zo-sgd" not in line
