"""``expertkit train``: per-scheme ZO defaults, optimizer parameters, one-line errors."""

from __future__ import annotations

import json

import pytest

from expertkit.cli.train_cmd import resolve_settings




def test_train_with_zo_uses_the_scheme_defaults(tiny_checkpoint, tmp_path, cli) -> None:
    out = tmp_path / "expert"
    code, stdout, err = cli(
        ["--quiet", "train", "leap_year", str(out), "--model", str(tiny_checkpoint("llama")), "--optimizer",
         "zo-sgd", "--scheme", "lora", "--steps", "2", "--batch-size", "2", "--param", "q=2"])
    assert code == 0, err
    assert "trained 2 steps" in stdout
    meta = json.loads((out / "expertkit.json").read_text())
    assert meta["lr"] == 1e-4 and meta["optimizer"] == "zo-sgd"
    assert meta["config"]["optimizer_params"] == {"q": 2, "eps": 1e-2}


def test_train_keeps_the_point_best_on_validation(tiny_checkpoint, tmp_path, cli) -> None:
    out = tmp_path / "expert"
    code, stdout, err = cli(
        ["--quiet", "train", "leap_year", str(out), "--model", str(tiny_checkpoint("llama")), "--steps", "3",
         "--batch-size", "2", "--select-n", "4", "--save-every", "1"])
    assert code == 0, err
    sel = json.loads((out / "expertkit.json").read_text())["selection"]
    assert sel["n"] == 4 and [s for s, _ in sel["curve"]] == [0, 1, 2, 3]
    assert f"kept step {sel['step']} of 3" in stdout
    code, _, err = cli(["train", "leap_year", str(tmp_path / "b"), "--select-n", "4", "--save-every", "0"])
    assert code == 2 and "save_every above 0" in err and "Traceback" not in err


@pytest.mark.parametrize("scheme,lr,eps", [("full", 1e-6, 1e-3), ("lora", 1e-4, 1e-2), ("prefix", 1e-2, 1e-1)])
def test_resolve_settings_per_scheme(scheme: str, lr: float, eps: float) -> None:
    assert resolve_settings("zo-adam", scheme, None, None, {}) == (lr, {"eps": eps})
    assert resolve_settings("zo-adam", scheme, 0.5, None, {"eps": 0.2}) == (0.5, {"eps": 0.2})
    assert resolve_settings("adamw", scheme, None, None, {}) == (None, {})


def test_train_errors_are_one_line(tmp_path, cli) -> None:
    code, _, err = cli(["train", "leap_year", str(tmp_path / "a"), "--optimizer", "zo-sdg"])
    assert code == 2 and "Did you mean 'zo-sgd'" in err and "Traceback" not in err
    code, _, err = cli(["train", "leap_year", str(tmp_path / "a"), "--optimizer", "zo-sgd",
                            "--scheme", "ful"])
    assert code == 2 and "Did you mean 'full'" in err
    code, _, err = cli(["train", "leap_year", str(tmp_path / "a"), "--param", "q"])
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = cli(["train", "leap_year", str(tmp_path / "a"), "--eps", "0.1"])
    assert code == 2 and "first-order" in err
