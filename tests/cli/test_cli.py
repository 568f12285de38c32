"""The command line: one-line errors with exit status 2, validate, info, run."""

from __future__ import annotations

import json

import pytest
import torch

from expertkit.cli.main import main




def test_help_lists_commands(cli):
    code, out, _ = cli(["--help"])
    assert code == 0
    for command in ("info", "validate", "run"):
        assert command in out


def test_validate_reports_two_typos_of_one_file(tmp_path, cli):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: demo\nmodle: smollm2-135m\nstages:\n  - kind: generate\n    prompt: [hi]\n")
    code, _, err = cli(["validate", str(cfg)])
    assert code == 2
    assert "unknown key 'modle'. Did you mean 'model'?" in err
    assert "stages[0].prompt: unknown key 'prompt'. Did you mean 'prompts'?" in err
    assert "Traceback" not in err


def test_validate_ok_loads_no_weights(tmp_path, monkeypatch, cli):
    import expertkit.models.loader as loader

    def boom(*a, **k):
        raise AssertionError("validate must not load a model")

    monkeypatch.setattr(loader, "load_model", boom)
    monkeypatch.setattr(loader, "resolve", boom)
    code, out, _ = cli(["validate", "examples/quickstart.yaml"])
    assert code == 0, out
    assert "is valid" in out and "5 stage(s)" in out


def test_validate_recognises_merge_plan_and_federated_configs(tmp_path, cli):
    code, out, _ = cli(["validate", "examples/fl_tiny.yaml"])
    assert code == 0, out
    assert "valid as a federated-learning config" in out and "expertkit fl simulate examples/fl_tiny.yaml" in out
    merge = tmp_path / "merge.yaml"
    merge.write_text("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n")
    code, out, _ = cli(["validate", str(merge)])
    assert code == 0, out
    assert "valid as a merge config" in out
    merge.write_text("merge_method: linear\ndtyp: float32\nmodels:\n  - model: a\n")
    code, _, err = cli(["validate", str(merge)])
    assert code == 2 and "unknown key 'dtyp'. Did you mean 'dtype'?" in err
    assert "stages" not in err  # checked against the merge schema, not the run schema


def test_unknown_model_is_one_line_exit_2(tmp_path, cli):
    code, out, err = cli(["info", "smollm3-135m"])
    assert code == 2
    assert "unknown model 'smollm3-135m'. Did you mean 'smollm2-135m'?" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_traceback():
    from expertkit.errors import UnknownNameError

    with pytest.raises(UnknownNameError):
        main(["--debug", "info", "smollm3-135m"])


def test_info_refuses_pickle_exit_2_one_line(tmp_path, cli):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    code, _, err = cli(["info", str(tmp_path)])
    assert code == 2
    assert "pickle" in err and "allow" in err
    assert len(err.strip().splitlines()) == 1
    code, out, _ = cli(["info", str(tmp_path), "--allow-pickle", "--json"])
    assert code == 0
    assert json.loads(out)["num_parameters"] == 2


EXPECTED_MOE = {"mixtral": ("expert", "router"), "qwen2_moe": ("expert", "router", "shared_expert"),
                "switch_transformers": ("expert", "router")}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "t5", "mixtral", "qwen2_moe",
                                  "switch_transformers"])
def test_info_lists_groups_for_every_tiny_architecture(arch, tiny_checkpoint, cli):
    code, out, err = cli(["info", str(tiny_checkpoint(arch)), "--json"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["architecture"] == arch and not summary["inferred"]
    assert summary["other"] == []
    groups = summary["groups"]
    assert {"embedding", "attention", "norm"} <= set(groups)
    assert sum(g["tensors"] for g in groups.values()) == summary["num_tensors"]
    for group in EXPECTED_MOE.get(arch, ()):
        assert group in groups, group
    if arch in EXPECTED_MOE:
        assert summary["num_experts"] == 4
        layers = 4 if arch == "switch_transformers" else 2  # switch: MoE layers over encoder + decoder
        assert groups["router"]["tensors"] == layers
    else:
        assert "expert" not in groups and "router" not in groups and summary["num_experts"] == 0
