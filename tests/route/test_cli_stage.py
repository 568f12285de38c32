"""``expertkit route build / eval / generate / methods`` and the ``route`` stage on a tiny llama."""

from __future__ import annotations

import json

import pytest
import yaml

TINY_TRAIN = {"steps": 2, "batch_size": 2, "rank": 2, "target_modules": ["q_proj", "v_proj"], "save_every": 0}


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    """A two-expert library on the tiny llama, built once through the command line."""
    import os

    from expertkit.cli.main import main

    root = tmp_path_factory.mktemp("route-cli")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_checkpoint("llama")), "tasks": ["reverse_words", "leap_year"],
                                      "train": TINY_TRAIN, "gates": {"steps": 2, "batch_size": 2}}))
    old = os.environ.get("EXPERTKIT_CACHE")
    os.environ["EXPERTKIT_CACHE"] = str(root / "cache")
    code = 0
    try:
        main(["route", "build", str(recipe), "--out", str(root / "lib")])
    except SystemExit as exc:
        code = exc.code
    finally:
        if old is None:
            os.environ.pop("EXPERTKIT_CACHE")
        else:
            os.environ["EXPERTKIT_CACHE"] = old
    assert code in (0, None)
    return root / "lib"


def test_route_eval_generate_and_methods(cli, built, tmp_path) -> None:
    manifest = json.loads((built / "library.json").read_text())
    assert [e["name"] for e in manifest["experts"]] == ["reverse_words", "leap_year"]
    assert all(e["gates"] for e in manifest["experts"])
    code, out, err = cli(["route", "eval", str(built), "-t", "leap_year", "-m", "phatgoose", "-n", "3",
                          "-o", str(tmp_path / "r.json")])
    assert code == 0, err
    assert out.startswith("phatgoose on leap_year (n=3): accuracy")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["tasks"]["leap_year"]["scores"]) == 3
    assert saved["tasks"]["leap_year"]["accuracy"] == sum(saved["tasks"]["leap_year"]["scores"]) / 3
    code, out, err = cli(["route", "generate", str(built), "ab", "cd", "-m", "uniform", "--max-new-tokens", "3"])
    assert code == 0, err
    assert out.count("> ") == 2 and "> ab" in out
    code, out, _ = cli(["route", "methods"])
    assert code == 0 and out.startswith("glider: GLIDER") and "\narrow: Arrow" in out


def test_route_commands_refuse_bad_input_in_one_line(cli, built, tmp_path) -> None:
    code, _, err = cli(["route", "eval", str(tmp_path), "-t", "gcd"])
    assert code == 2 and "is not an expert library" in err and err.count("\n") == 1
    code, _, err = cli(["route", "eval", str(built), "-t", "gcd", "-m", "glidr"])
    assert code == 2 and "glider" in err
    code, _, err = cli(["route", "generate", str(built), "x" * 300, "-m", "uniform"])
    assert code == 2 and "longer than the model's context" in err and err.count("\n") == 1


def test_route_stage_compares_methods_on_the_same_examples(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    from expertkit.pipeline import run_pipeline

    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "r", "model": str(tiny_checkpoint("llama")), "seed": 0, "stages": [
        {"kind": "train_experts", "tasks": ["reverse_words", "leap_year"], "train": TINY_TRAIN},
        {"kind": "route", "held_out": ["syllogism"], "methods": ["phatgoose", "uniform", "oracle", "base"], "n": 2,
         "gates": {"steps": 1, "batch_size": 2}}]}))
    run_dir = run_pipeline(config, output_dir=tmp_path / "runs")
    report = (run_dir / "report.md").read_text()
    assert "| phatgoose |" in report and "held-out: syllogism" in report
    saved = json.loads((run_dir / "route" / "library.json").read_text())
    assert [e["task"] for e in saved["experts"]] == ["reverse_words", "leap_year"]
    oracle = next(line for line in report.splitlines() if line.startswith("| oracle |"))
    assert oracle.endswith("| - |")  # held-out syllogism has no oracle expert


def test_route_stage_config_errors_are_reported_together(cli, tmp_path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"name": "r", "model": "smollm2-135m", "stages": [
        {"kind": "route", "tasks": ["gcdd"], "held_out": ["gsm8k", "sylogism"], "methods": ["glidr"]}]}))
    code, _, err = cli(["validate", str(config)])
    assert code == 2 and "3 problems" in err
    assert "Did you mean 'gcd'" in err and "Did you mean 'syllogism'" in err and "Did you mean 'glider'" in err
    assert "evaluation only" not in err  # gsm8k (no train split) may be held out
