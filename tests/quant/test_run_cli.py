"""End to end on tiny MoEs: every budgeted policy meets its budget; scorers find what was planted; the CLI and stage."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from expertkit.models import load_model
from expertkit.models.tiny import save_tiny
from expertkit.quant.config import QuantizeConfig
from expertkit.quant.run import quantize_model

CALIB = {"text_blocks": 0, "tasks": ["add_sub", "gcd"], "prompts_per_task": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("q") / "m", seed=5)


def _cfg(folder, policy, **over):
    return QuantizeConfig.model_validate({"model": str(folder), "group_size": 32, "calibration": CALIB,
                                          "policy": policy, **over})


@pytest.mark.parametrize("policy", [
    {"kind": "block", "favour": ["attention"]}, {"kind": "expert_frequency"}, {"kind": "linear_kind"},
    {"kind": "layer_position", "k": 1}, {"kind": "outlier"}, {"kind": "block_importance"}, {"kind": "random"},
])
def test_every_budgeted_policy_meets_its_budget_on_a_tiny_moe(mixtral, policy):
    result = quantize_model(_cfg(mixtral, {**policy, "target_bits": 3.0, "choices": [2, 3, 4]}, method="rtn"))
    a = result.allocation
    # 32-column groups with float16 scales: 0.5 bits of scale per weight, so 2.5 code bits on average
    assert a.achieved == 3.0 and a.code_bits == 2.5 and a.total_bits == 3 * a.weights
    stored = sum(r.scheme.storage_bits(r.target.rows, r.target.cols) for r in result.records.values())
    assert stored == a.total_bits  # what was quantized is what was counted
    by = result.report()["bits_by_structure"]
    if policy["kind"] == "block":
        assert by["group"]["attention"]["bits"] > by["group"]["expert"]["bits"]
    if policy["kind"] == "linear_kind":
        assert by["kind"]["down"]["bits"] > by["kind"]["gate_up"]["bits"]
    if policy["kind"] == "layer_position":
        assert by["layer"]["0"]["bits"] > by["layer"]["1"]["bits"]


def test_the_outlier_scorer_ranks_a_planted_outlier_first_and_it_gets_the_most_bits(mixtral):
    loaded = load_model(str(mixtral))
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.experts.down_proj[2, 5, 7] = 3.0  # one huge weight in expert 2's w2
    result = quantize_model(_cfg(mixtral, {"kind": "outlier", "target_bits": 3.0, "choices": [2, 4]},
                                 method="rtn"), loaded)
    planted = "model.layers.1.mlp.experts.down_proj[2].w2"
    outliers = result.context.outliers
    assert max(outliers, key=outliers.get) == planted
    bits = result.allocation.bits
    assert bits[planted] == 4 and list(bits.values()).count(4) < len(bits) / 2  # among the few at 4 bits


def test_frequently_routed_experts_get_more_bits(mixtral):
    loaded = load_model(str(mixtral))
    with torch.no_grad():  # expert 1 of layer 0 wins every token's top-2; expert 3 never does
        loaded.model.model.layers[0].mlp.gate.weight[1] = 0.0
        loaded.model.model.layers[0].mlp.gate.weight[3] = 0.0
        loaded.model.model.layers[0].mlp.gate.weight[1, 0] = 1e-3
    result = quantize_model(_cfg(mixtral, {"kind": "expert_frequency", "target_bits": 3.0, "choices": [2, 3, 4]}),
                            loaded)
    freq = result.context.frequencies[(None, 0)]
    bits = result.allocation.bits
    top, bottom = int(freq.argmax()), int(freq.argmin())
    assert top != bottom
    assert bits[f"model.layers.0.mlp.experts.down_proj[{top}].w2"] > bits[f"model.layers.0.mlp.experts.down_proj[{bottom}].w2"]
    report = result.report()["tokens_per_expert"]["model.layers.0.mlp.experts"]
    assert min(r + a for r, a in zip(report["routed"], report["added"], strict=True)) > 0  # balanced: all saw tokens


def test_quant_commands_run_inspect_and_list_policies(cli, mixtral, tmp_path):
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump({"model": str(mixtral), "group_size": 32, "calibration": CALIB,
                                      "policy": {"kind": "block", "target_bits": 3.5, "favour": ["attention"]}}))
    code, out, err = cli(["quant", "run", str(config), str(tmp_path / "q")])
    assert code == 0, err
    assert "3.5000 bits per weight with scales (target 3.5)" in out and "Tokens per expert: min" in out
    report = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert report["bits"]["achieved_bits"] == 3.5 and report["method"] == "gptq"
    code, out, err = cli(["quant", "inspect", str(tmp_path / "q")])
    assert code == 0, err
    assert "block policy; 3.5000 bits per quantized weight" in out and "attention" in out and "down (kind)" in out
    code, out, _ = cli(["quant", "policies"])
    assert code == 0 and "expert_frequency: More bits for frequently" in out and "target_bits: required" in out
    code, out, _ = cli(["quantize", str(config), str(tmp_path / "q"), "--check"])
    assert code == 0 and "gptq of" in out and "block policy" in out
    code, _, err = cli(["quant", "run", str(config), str(tmp_path / "q")])
    assert code == 2 and "exists; pass --overwrite" in err and err.count("\n") == 1


@pytest.mark.parametrize(("policy", "message", "lines"), [  # a config's problems are listed one per line
    ({"kind": "uniform", "bits": 9}, "1 problem:\n  - policy.uniform.bits: 9 bits is not a weight precision", 2),
    ({"kind": "block", "target_bits": 3, "favour": ["routers"]}, "policy.block.favour[0]: Input should be 'attention'", 2),
    ({"kind": "outlier", "target_bits": 1.5, "choices": [3, 4]}, "cannot meet a budget of 1.5 bits per weight", 1),
])
def test_bad_configs_are_one_clear_error_exit_2(cli, mixtral, tmp_path, policy, message, lines):
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump({"model": str(mixtral), "group_size": 32, "method": "rtn",
                                      "calibration": CALIB, "policy": policy}))
    code, _, err = cli(["quant", "run", str(config), str(tmp_path / "out")])
    assert code == 2 and message in err and err.count("\n") == lines
    assert not (tmp_path / "out").exists()


def test_inspect_refuses_a_folder_without_a_report(cli, tmp_path):
    code, _, err = cli(["quant", "inspect", str(tmp_path)])
    assert code == 2 and "has no quantization.json" in err


def test_the_quantize_stage_measures_perplexity_and_reports_bits(mixtral, tmp_path):
    from expertkit.pipeline import run_pipeline

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "q", "model": str(mixtral), "seed": 0, "stages": [
        {"kind": "quantize", "group_size": 32, "calibration": CALIB, "perplexity_blocks": 2,
         "policy": {"kind": "linear_kind", "target_bits": 3.0}}]}))
    run_dir = run_pipeline(config, output_dir=tmp_path / "runs")
    report = (run_dir / "report.md").read_text()
    assert "quantized by gptq with a `linear_kind` policy" in report and "3.0000 bits per weight" in report
    assert "Held-out perplexity:" in report and "| expert |" in report
    back = load_model(str(run_dir / "quantized" / "model"))
    assert back.model.config.num_local_experts == 4


def test_reused_hessians_give_the_same_model_and_feed_the_block_scorer(mixtral):
    from expertkit.quant.calibrate import calibrate
    from expertkit.quant.data import calibration_batches
    from expertkit.quant.targets import find_targets

    policy = {"kind": "block_importance", "target_bits": 3.0, "choices": [2, 3, 4], "predicted": False}
    fresh = quantize_model(_cfg(mixtral, policy))
    loaded = load_model(str(mixtral))
    batches = calibration_batches(loaded.tokenizer, text_blocks=0, tasks=CALIB["tasks"], prompts_per_task=4, batch_size=4)
    hessians = calibrate(loaded.model, batches, find_targets(loaded.model), min_tokens_per_expert=128)
    reused = quantize_model(_cfg(mixtral, policy), loaded, calibration=hessians, batches=batches)
    assert reused.context.block_importance == fresh.context.block_importance
    assert reused.allocation.bits == fresh.allocation.bits
    a, b = fresh.loaded.model.state_dict(), reused.loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_quantized_model_never_reuses_the_unquantized_models_cached_evaluations(mixtral, tmp_path):
    from expertkit.tasks.evaluate import evaluate

    loaded = load_model(str(mixtral))
    evaluate(loaded, None, "add_sub", n=2, cache_dir=tmp_path / "eval")
    result = quantize_model(_cfg(mixtral, {"kind": "uniform", "bits": 2}, method="rtn"), loaded)
    evaluate(result.loaded, None, "add_sub", n=2, cache_dir=tmp_path / "eval")
    assert len(list((tmp_path / "eval").rglob("*.json"))) == 2  # its own cache entry, not the source's
