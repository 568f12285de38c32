"""``expertkit moe build / stats`` and the moe_build / moe_stats stages, on tiny models; docs/moe.md runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = {"clusters": [{"name": "a", "tasks": ["add_sub"]}, {"name": "b", "tasks": ["leap_year"]},
                       {"name": "c", "tasks": ["gcd"]}],
          "expert_steps": 2, "batch_size": 2, "text_tokens": 16, "router": {"steps": 1, "init_prompts": 2, "batch_size": 2}}


def test_moe_build_and_stats_commands(cli, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(tiny_checkpoint("llama")), **RECIPE}))
    code, out, err = cli(["moe", "build", str(recipe), str(tmp_path / "moe")])
    assert code == 0, err
    assert "3 experts, top-2, mixtral" in out and "effective rank" in out
    code, out, err = cli(["moe", "stats", str(tmp_path / "moe"), "-t", "add_sub", "-t", "gcd", "-n", "3",
                          "-o", str(tmp_path / "stats")])
    assert code == 0, err
    assert "2 MoE layers x 3 experts (top-2)" in out
    info = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert info["summary"]["tasks"] == ["add_sub", "gcd"] and info["layers"] == ["0", "1"]
    data = np.load(tmp_path / "stats" / "stats.npz")
    assert data["counts"].shape == (2, 3) and data["counts"].sum(axis=1).tolist() == [2 * data["tokens"][0]] * 2
    assert (tmp_path / "stats" / "usage.png").stat().st_size > 1000 and (tmp_path / "stats" / "tasks.png").is_file()


def test_moe_stats_on_a_dense_model_is_one_line_exit_2(cli, tiny_checkpoint):
    code, out, err = cli(["moe", "stats", str(tiny_checkpoint("llama")), "-t", "gcd"])
    assert code == 2
    assert err.count("\n") == 1 and "'llama' (llama) is a dense architecture" in err


def test_moe_build_with_a_misspelt_key_names_the_nearest(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"expert_stpes": 3}))
    code, _, err = cli(["moe", "build", str(recipe)])
    assert code == 2 and "expert_steps" in err


def test_pipeline_stages_build_evaluate_and_read_routing(tiny_checkpoint, tmp_path, monkeypatch):
    from expertkit.pipeline import run_pipeline

    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "m", "model": str(tiny_checkpoint("llama")), "seed": 0, "stages": [
        {"kind": "moe_build", **RECIPE, "n": 3}, {"kind": "moe_stats", "n": 2}]}))
    run_dir = run_pipeline(config, output_dir=tmp_path / "runs")
    report = (run_dir / "report.md").read_text()
    assert "mixtral with 3 experts (a, b, c), top-2" in report
    assert re.search(r"\| add_sub \| a \| [01]\.\d\d \[", report)  # MoE and base scored per cluster task
    assert (run_dir / "moe" / "config.json").is_file() and (run_dir / "moe_usage.png").is_file()
    assert "Routing of" in report and "balance CV" in report


def test_docs_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    block = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "moe.md").read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, "docs/moe.md", "exec"), namespace)  # noqa: S102 - our own docs
    stats = namespace["stats"]
    assert stats.frequencies().shape == (2, 3)
    np.testing.assert_allclose(stats.frequencies().sum(axis=1), 1.0)
    assert "entropy_rank_mean" in capsys.readouterr().out
