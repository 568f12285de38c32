"""``expertkit moe compress``, the moe_compress stage on tiny Qwen3-MoE and OLMoE, distillation recovery."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from expertkit.models import load_model
from expertkit.moe.compress import CompressConfig, compress_moe
from expertkit.moe.compress.config import Distill
from expertkit.moe.compress.kd import distill, kd_loss, memory_experts, write_recovered
from expertkit.moe.compressed import expert_parameters

from .helpers import save_with_strong_experts

CAL = {"tasks": ["add_sub", "gcd"], "n": 3, "batch_size": 3}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_compress_command_writes_a_loadable_smaller_moe(cli, tiny_checkpoint, tmp_path, cache):
    recipe = tmp_path / "c.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_checkpoint("mixtral")), "method": "msmoe",
                                      "experts_per_layer": 2, "allocation": "uniform", "calibration": CAL}))
    code, out, err = cli(["moe", "compress", str(recipe), str(tmp_path / "out")])
    assert code == 0, err
    assert "expert parameters 98,304 of 196,608 (50.0% removed)" in out and "approximate routing" in out
    record = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert record["experts_per_layer"] == [2, 2] and record["calibration"]["tasks"] == ["add_sub", "gcd"]
    assert expert_parameters(load_model(tmp_path / "out").model) == 98_304
    code, _, err = cli(["moe", "compress", str(recipe), str(tmp_path / "out")])
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    code, out, _ = cli(["moe", "compress", "methods"])
    assert code == 0 and all(m in out for m in ("msmoe:", "hcsmoe:", "reap:", "prune_frequency:", "random_group:"))


def test_compress_command_refusals_are_one_line(cli, tiny_checkpoint, tmp_path, cache):
    recipe = tmp_path / "c.yaml"
    for body, expected, lines in (
            ({"model": str(tiny_checkpoint("llama")), "calibration": CAL}, "dense architecture", 1),
            ({"model": "x", "method": "msmo"}, "Did you mean 'msmoe'", 1),
            ({"model": "x", "expert_per_layer": 2}, "Did you mean 'experts_per_layer'", 2)):  # config errors: a list
        recipe.write_text(yaml.safe_dump(body))
        code, _, err = cli(["moe", "compress", str(recipe), str(tmp_path / "out")])
        assert code == 2 and expected in err and err.count("\n") == lines, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_pipeline_compresses_distills_and_evaluates(arch, tiny_checkpoint, tmp_path, cache):
    from expertkit.pipeline import run_pipeline

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "c", "model": str(tiny_checkpoint(arch)), "seed": 0, "stages": [
        {"kind": "moe_compress", "method": "msmoe", "experts_per_layer": 2, "allocation": "uniform",
         "calibration": CAL, "lowrank": {"keep": 0.5}, "kd": {"steps": 2, "batch_size": 2}, "n": 2}]}))
    run_dir = run_pipeline(config, output_dir=tmp_path / "runs")
    report = (run_dir / "report.md").read_text()
    assert "msmoe + low rank + sparse (keep 0.5) + 2 distillation steps" in report
    assert "| add_sub |" in report and "exact McNemar" in report and "router rows combined: approximate" in report
    record = json.loads((run_dir / "compressed" / "msmoe" / "compress.json").read_text())
    assert len(record["kd"]["losses"]) == 2 and record["expert_parameters"]["removed_share"] >= 0.74
    model = load_model(run_dir / "compressed" / "msmoe").model
    assert expert_parameters(model) == record["expert_parameters"]["after"]


def test_distillation_lowers_the_kl_to_the_teacher_and_is_written_back(tmp_path, cache):
    from expertkit.tasks.base import get_task
    from expertkit.tasks.infer import pad_id_of
    from expertkit.train.data import collate, encode_examples

    src = save_with_strong_experts("mixtral", tmp_path / "src")
    recipe = CompressConfig(model=str(src), experts_per_layer=2, allocation="uniform", calibration=CAL)
    first = compress_moe(recipe, tmp_path / "c")
    teacher, student = load_model(src), load_model(first.path)
    task = get_task("add_sub")  # held-out rows: distillation trains on the train split
    ids, mask, _ = collate(encode_examples(student.tokenizer, task, task.examples("validation", 8, 1), 256),
                           pad_id_of(student.tokenizer))

    def gap() -> float:
        with torch.no_grad():
            return float(kd_loss(student.model(input_ids=ids, attention_mask=mask).logits,
                                 teacher.model(input_ids=ids, attention_mask=mask).logits, mask, 1.0))

    router = {n: p.detach().clone() for n, p in student.model.named_parameters() if "gate.weight" in n}
    flags = {n: p.requires_grad for n, p in student.model.named_parameters()}
    before = gap()
    rec = distill(student.model, teacher.model, student.tokenizer, ["add_sub"],
                  Distill(steps=12, lr=3e-3, batch_size=4, general_fraction=0.0), seed=0)
    # measured: 0.017 -> 0.0028 on the held-out rows; the routers stay as the compression chose them
    assert gap() < 0.5 * before and rec["losses"][-1] < 0.5 * rec["losses"][0]
    assert router and all(torch.equal(p, router[n]) for n, p in student.model.named_parameters() if n in router)
    assert {n: p.requires_grad for n, p in student.model.named_parameters()} == flags
    out = write_recovered(student.model, first.path, tmp_path / "kd", {"kd": rec})
    reread = load_model(out)
    layout = json.loads((out / "config.json").read_text())["expertkit_compressed_moe"]
    mine, theirs = memory_experts(student.model, layout), memory_experts(reread.model, layout)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((out / "compress.json").read_text())["kd"]["steps"] == 12
    assert (out / "stock" / "config.json").is_file()
