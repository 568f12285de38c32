"""experiments/portllm.py: the smoke run end to end, and its threshold and fit read off known numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def exp():
    return load_script("experiments/portllm.py")


def test_smoke_run_pairs_every_system_per_level(exp, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    from expertkit.tasks.base import TASKS

    monkeypatch.setattr(TASKS, "_entries", dict(TASKS._entries))  # the smoke run registers its toy task
    out = tmp_path / "run"
    res = exp.main(["--smoke", "--out", str(out), "--part", "accuracy"])
    acc = res["accuracy"]
    assert [lv["level"] for lv in acc["levels"]] == ["2:1e-3", "2:1e-2"]
    assert acc["levels"][0]["drift"] < acc["levels"][1]["drift"]  # the stronger evolution moved the base further
    for lv in acc["levels"]:
        systems = lv["tasks"]["lo-hi"]
        assert set(systems) == {"zero_shot", "ported", "finetuned", "old_patch"}
        assert {len(s) for s in systems.values()} == {8}  # the same examples for every system
        assert lv["finetuned_vs_ported"]["n"] == 8 and len(lv["verdicts"]) == 4
    assert json.loads((out / "results.json").read_text()) == res
    assert (out / "portllm.png").stat().st_size > 1000
    assert "LoRA fine-tuning on the new base beats the ported patch" in capsys.readouterr().out
    # a rerun reuses the evolved bases and gives the same scores
    made = (out / "base-2-0.01" / "expertkit.json").stat().st_mtime_ns
    again = exp.main(["--smoke", "--out", str(out), "--part", "accuracy"])
    assert (out / "base-2-0.01" / "expertkit.json").stat().st_mtime_ns == made
    assert again["accuracy"]["levels"][1]["tasks"] == acc["levels"][1]["tasks"]


def test_memory_part_probes_each_size_in_fresh_processes(exp, tmp_path, monkeypatch):
    """The probes' orchestration with recorded peaks (a training probe costs a fresh process that imports
    transformers and peft, about 10 s); one real probe checks the child code and the VmHWM reading."""
    out = tmp_path / "run"
    real = exp.peak_rss(exp.PORT_IMPORTS)[0]
    assert 50 < real < 5000  # a Python process that imported torch: MB, not KB or bytes
    calls = []

    def fake(code, *args):
        calls.append((code, args))
        if code == exp.PORT_CHILD:
            assert (Path(args[0]) / "adapter_config.json").is_file() and (Path(args[1]) / "config.json").is_file()
            Path(args[2]).mkdir()  # the dense copy the real probe writes
        peaks = {exp.PORT_IMPORTS: 200.0, exp.TRAIN_IMPORTS: 300.0, exp.PORT_CHILD: 210.0,
                 exp.TRAIN_CHILD: 400.0 + len(calls)}
        return peaks[code], 1.0

    monkeypatch.setattr(exp, "peak_rss", fake)
    res = exp.main(["--smoke", "--out", str(out), "--part", "memory"])
    mem = res["memory"]
    assert [c[0] for c in calls] == [exp.PORT_IMPORTS, exp.TRAIN_IMPORTS] + [exp.PORT_CHILD, exp.TRAIN_CHILD] * 2
    assert [r["size"] for r in mem["sizes"]] == ["s", "m"]
    assert mem["sizes"][0]["parameters"] < mem["sizes"][1]["parameters"]
    first = mem["sizes"][0]
    assert (first["train_mb"], first["port_mb"], first["ratio"]) == (404.0, 210.0, 404.0 / 210.0)
    assert (first["train_above_mb"], first["port_above_mb"]) == (104.0, 10.0)
    assert not (out / "memory" / "s" / "ported").exists()  # the dense copy is not kept
    assert "accuracy" not in res and "The paper's 12.2x" in exp.markdown(res)
    compile(exp.TRAIN_CHILD + exp.PEAK, "train-child", "exec")


def test_threshold_and_the_papers_ratio_from_known_numbers(exp):
    def level(drift, diff, p):
        return {"drift": drift, "old_patch_vs_ported": {"diff": diff, "p_value": p}}

    # lost: the patch on its own base significantly ahead; a port ahead or a difference within noise is not
    levels = [level(0.002, -0.02, 0.02), level(0.01, 0.05, 0.2), level(0.05, 0.4, 1e-9), level(0.02, 0.2, 1e-4)]
    assert exp._threshold(levels) == {"largest_safe_drift": 0.01, "smallest_unsafe_drift": 0.02}
    # fine-tuning 400 MB + 4 bytes per parameter, porting a flat 360 MB: 12.2 x 360 = 400 + 4e-6 N
    rows = [{"parameters": n, "train_mb": 400 + 4e-6 * n, "port_mb": 360.0,
             "train_above_mb": 4e-6 * n, "port_above_mb": 10.0} for n in (1e8, 5e8, 1e9)]
    at = exp._paper_ratio_at(rows)
    assert at["whole"] == pytest.approx((12.2 * 360 - 400) / 4e-6)
    assert at["above"] == pytest.approx(12.2 * 10 / 4e-6)
    # porting that grows as fast as fine-tuning never reaches the ratio
    flat = [{**r, "port_mb": r["train_mb"], "port_above_mb": r["train_above_mb"]} for r in rows]
    assert exp._paper_ratio_at(flat) == {"whole": None, "above": None}


def test_bad_levels_and_sizes_are_refused_before_any_work(exp, tmp_path, capsys):
    with pytest.raises(SystemExit, match="a level is STEPS:LR"):
        exp._args(["--levels", "60-1e-4", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        exp._args(["--sizes", "13b", "--out", str(tmp_path)])
    assert "unknown --sizes ['13b']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
