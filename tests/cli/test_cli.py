"""The command line: one-line errors with exit status 2, validate, info, run."""

from __future__ import annotations

import json
import os

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


@pytest.fixture
def extra_command(monkeypatch):
    """Register a command on the app for one test: ``extra_command(name, fn)``."""
    from expertkit.cli.main import app

    monkeypatch.setattr(app, "registered_commands", list(app.registered_commands))
    return lambda name, fn: app.command(name)(fn)


def test_return_values_and_typer_exit_codes_pass_through(extra_command, cli):
    import typer

    def returns_three() -> int:
        return 3

    def exits_four() -> None:
        raise typer.Exit(4)

    def returns_nothing() -> None:
        print("fine")

    extra_command("returns-three", returns_three)
    extra_command("exits-four", exits_four)
    extra_command("returns-nothing", returns_nothing)
    assert cli(["returns-three"])[0] == 3
    assert cli(["exits-four"])[0] == 4
    assert cli(["returns-nothing"])[:2] == (0, "fine\n")


WAITING_COMMAND = """
import sys, time
from expertkit.cli.main import app, main

@app.command("wait")
def wait() -> None:
    print("waiting", flush=True)
    time.sleep(120)

main(["wait"])
"""


def test_ctrl_c_exits_130_with_one_line():
    import signal
    import subprocess
    import sys

    # a terminal's default SIGINT disposition for the child: a shell's background job (``make test &``)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all
    proc = subprocess.Popen([sys.executable, "-c", WAITING_COMMAND], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == "waiting\n"  # the command is running
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err


def test_os_error_is_one_line_exit_2_and_debug_shows_it(extra_command, cli, tmp_path):
    (tmp_path / "file").write_text("x")

    def write_under_a_file() -> None:
        (tmp_path / "file" / "out").mkdir()

    extra_command("write-under-a-file", write_under_a_file)
    code, _, err = cli(["write-under-a-file"])
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (f"error: Not a directory: {tmp_path / 'file' / 'out'} "
                           "(a part of the path is a file, not a folder).")
    with pytest.raises(NotADirectoryError):
        main(["--debug", "write-under-a-file"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(tmp_path, cli):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = cli(["tasks", "export", "gcd", str(folder / "out"), "-n", "2"])
    finally:
        folder.chmod(0o755)
    assert code == 2 and "Permission denied" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "out").exists()


def test_help_texts_show_no_rst_markup(cli):
    for args in (["--help"], ["validate", "--help"], ["merge", "--help"], ["train", "--help"]):
        code, out, _ = cli(args)
        assert code == 0 and "``" not in out and ":class:" not in out, args
    code, out, _ = cli(["validate", "--help"])
    assert "A run config ('stages:') is checked as such" in out


def test_plain_strips_roles_literals_and_escapes():
    from expertkit.cli.helptext import plain

    text = "Reads :class:`~expertkit.weights.Checkpoint`\\ s and :func:`merge`; see ``expertkit info``\nand `x`."
    assert plain(text) == "Reads Checkpoints and merge; see 'expertkit info' and 'x'."
    assert plain("* one\n* two") == "* one\n* two"  # lists keep their lines


def test_stages_print_required_or_the_real_default(cli):
    code, out, _ = cli(["stages"])
    assert code == 0 and "PydanticUndefined" not in out
    assert "    params (default {}): the method's parameters" in out  # a default_factory
    assert "    prompts (required): questions to answer" in out
    code, out, _ = cli(["optimizers"])
    assert code == 0 and "PydanticUndefined" not in out and "    q (default 1):" in out


def test_merge_config_typo_suggests_a_key_that_is_accepted(tmp_path, cli):
    merge = tmp_path / "merge.yaml"
    merge.write_text("merge_method: linear\nmodles: [a]\nmodels:\n  - model: a\n")
    code, _, err = cli(["validate", str(merge)])
    assert code == 2 and "unknown key 'modles'. Did you mean 'models'?" in err
