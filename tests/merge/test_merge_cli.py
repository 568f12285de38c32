"""``expertkit merge``: methods listing, a mergekit-style YAML end to end, one-line errors."""

from __future__ import annotations

import pytest
import torch

from expertkit.cli.main import main
from expertkit.merge import METHODS, load_merge_config, merge_state_dicts
from expertkit.weights import Checkpoint


def run_cli(args, capsys):
    code = 0
    try:
        main(["--quiet", *args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_methods_lists_every_registered_method_with_parameters(capsys):
    code, out, _ = run_cli(["merge", "methods"], capsys)
    assert code == 0
    for name in METHODS.names():
        assert f"{name}:" in out
    assert "density (default 1.0) [per model]" in out and "lambda (default 1.0)" in out


def test_mergekit_style_yaml_runs_and_matches_the_reference(tmp_path, tiny_checkpoint, capsys):
    base, a, b = (tiny_checkpoint("llama", s) for s in range(3))
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"""# a config as mergekit users write it
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters:
      density: 0.5
      weight: 0.6
  - model: {b}
    parameters:
      density: 0.5
      weight: 0.4
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""")
    code, out, err = run_cli(["merge", str(cfg), str(tmp_path / "out")], capsys)
    assert code == 0, err
    sds = []
    for p in (a, b, base):
        with Checkpoint(p) as ck:
            sds.append(dict(ck.iter_tensors()))
    ref = merge_state_dicts("ties", sds[:2], sds[2], weights=[0.6, 0.4], params={"density": 0.5})
    with Checkpoint(tmp_path / "out") as ck:
        assert all(torch.equal(ck.read(k), ref[k]) for k in ref)
    code, out, _ = run_cli(["merge", str(cfg), "--check"], capsys)
    assert code == 0 and "compatible" in out


def test_config_typos_and_unsupported_keys_are_one_line_errors(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("merge_method: tie\nmodels:\n  - model: x\n    paramters: {}\nresidual: 1\n")
    code, _, err = run_cli(["merge", str(cfg), str(tmp_path / "out")], capsys)
    assert code == 2 and "Traceback" not in err
    assert "Did you mean 'ties'" in err and "unknown key 'paramters'" in err
    assert not (tmp_path / "out").exists()
    cfg.write_text("merge_method: linear\nmodules: {}\nmodels:\n  - model: x\n")
    with pytest.raises(Exception, match="modules"):
        load_merge_config(cfg)


def test_parameter_typos_are_caught_by_check_before_any_work(tmp_path, tiny_checkpoint, capsys):
    base, a = tiny_checkpoint("llama", 0), tiny_checkpoint("llama", 1)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   "parameters:\n  densty: 0.3\n")
    code, _, err = run_cli(["merge", str(cfg), "--check"], capsys)
    assert code == 2 and "unknown key 'densty'. Did you mean 'density'?" in err


def test_per_model_parameter_typos_and_global_ones_set_per_model_are_refused(tmp_path, tiny_checkpoint, capsys):
    base, a, b = tiny_checkpoint("llama", 0), tiny_checkpoint("llama", 1), tiny_checkpoint("llama", 2)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {b}\n    parameters: {{wieght: 0.5}}\n")
    code, _, err = run_cli(["merge", str(cfg), str(tmp_path / "out")], capsys)
    assert code == 2 and "model 2: unknown per-model parameter 'wieght'. Did you mean 'weight'?" in err
    assert not (tmp_path / "out").exists()
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   "    parameters: {weight: 1, density: 0.5, normalize: false}\n")
    code, _, err = run_cli(["merge", str(cfg), "--check"], capsys)
    assert code == 2 and "'normalize' of merge method 'ties' cannot differ per model" in err
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   "    parameters: {weight: 1, density: 0.5}\nparameters: {normalize: false}\n")
    code, _, err = run_cli(["merge", str(cfg), "--check"], capsys)
    assert code == 0, err


def test_missing_quickstart_experts_say_to_run_make_run_first(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no runs/ folder yet
    code, _, err = cli(["--quiet", "zoo", "plan", "runs/quickstart/experts", "-t", "family_relation"])
    assert code == 2 and "runs/quickstart/experts" in err and "`make run`" in err and "Traceback" not in err
    cfg = tmp_path / "m.yaml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: runs/quickstart/experts/family_relation\n")
    code, _, err = cli(["--quiet", "merge", str(cfg), str(tmp_path / "out")])
    assert code == 2 and "`make run`" in err and "Traceback" not in err
    code, _, err = cli(["--quiet", "zoo", "plan", "elsewhere/experts", "-t", "family_relation"])
    assert code == 2 and "not found" in err and "make run" not in err  # only the quickstart's folder


def test_mergekits_tokenizer_section_is_refused_with_what_is_supported(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"
                   "tokenizer:\n  source: union\n  tokens:\n    <|im_start|>: {source: a}\n")
    with pytest.raises(Exception, match="token surgery.*tokenizer_source.*added tokens"):
        load_merge_config(cfg)


def test_validate_reports_every_parameter_key_a_method_does_not_take_without_weights(tmp_path, capsys):
    cfg = tmp_path / "m.yaml"  # the models do not exist: nothing is loaded
    cfg.write_text("merge_method: task_arithmetic\nbase_model: nowhere/base\nparameters: {rescale: true, lambda: 0.5}\n"
                   "models:\n  - model: nowhere/a\n    parameters: {weight: 1.0, density: 0.5}\n"
                   "  - model: nowhere/b\n    parameters: {weight: 1.0, scaling: 2}\n")
    code, _, err = run_cli(["validate", str(cfg)], capsys)
    assert code == 2 and "unknown key 'rescale'" in err and "lambda, normalize, weight" in err
    assert "model 1: unknown per-model parameter 'density'" in err
    assert "model 2: 'scaling' of merge method 'task_arithmetic' cannot differ per model" in err  # an alias of lambda
    cfg.write_text("merge_method: passthrough\nslices:\n  - sources:\n      - model: nowhere/a\n        layer_range: [0, 2]\n"
                   "        parameters: {scale: 0.5, int8_mask: true}\n    parameters: {scael: 1}\n")
    code, _, err = run_cli(["validate", str(cfg)], capsys)
    assert code == 2 and "slice 1 parameters: unknown key 'scael'. Did you mean 'scale'?" in err
    cfg.write_text("merge_method: passthrough\nslices:\n  - sources:\n      - model: nowhere/a\n        layer_range: [0, 2]\n"
                   "        parameters: {scale: 0.5, int8_mask: true}\n")
    code, out, err = run_cli(["validate", str(cfg)], capsys)
    assert code == 0 and "valid as a merge config" in out, err
