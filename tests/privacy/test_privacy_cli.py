"""``expertkit train --dp`` and ``expertkit privacy``: one line out, one line for an error (exit 2)."""

from __future__ import annotations

import json

import pytest

from expertkit.privacy.accounting import epsilon_spent


def test_train_dp_on_a_tiny_model_reports_the_privacy_spent(cli, tiny_checkpoint, tmp_path, monkeypatch):
    import expertkit.tasks  # noqa: F401 - registers built-ins first
    from expertkit.registry import Entry
    from expertkit.tasks.base import TASKS
    from expertkit.tasks.toy import copy_task

    monkeypatch.setitem(TASKS._entries, "copy-char", Entry("copy-char", copy_task(), summary="toy"))
    args = ["train", "copy-char", str(tmp_path / "a"), "--model", str(tiny_checkpoint("llama")), "--steps", "2",
            "--batch-size", "4", "--train-examples", "40", "--rank", "2", "--dp", "--noise-multiplier", "0.9",
            "--delta", "1e-3", "--max-grad-norm", "0.5", "--param", "rho=0.01"]
    code, out, err = cli(args)
    assert code == 0, err
    meta = json.loads((tmp_path / "a" / "expertkit.json").read_text())
    rep = meta["optimizer_report"]
    assert meta["optimizer"] == "dp-adamw" and meta["config"]["optimizer_params"]["rho"] == 0.01
    assert rep["max_grad_norm"] == 0.5 and rep["sample_rate"] == 0.1
    assert rep["epsilon"] == epsilon_spent(0.9, 0.1, 2, 1e-3)
    assert f"privacy spent: epsilon {rep['epsilon']:.3g} at delta 0.001 (noise multiplier 0.9, rdp)" in out


def test_dp_options_without_dp_and_dp_with_a_zeroth_order_optimizer_are_refused(cli, tmp_path):
    code, _, err = cli(["train", "family_relation", str(tmp_path / "x"), "--epsilon", "3"])
    assert code == 2 and "--epsilon only apply with --dp" in err and err.count("\n") == 1
    code, _, err = cli(["train", "family_relation", str(tmp_path / "x"), "--dp", "--optimizer", "zo-sgd"])
    assert code == 2 and "--dp needs a first-order optimizer (adamw or sgd); 'zo-sgd'" in err


def test_privacy_epsilon_and_an_unreachable_target(cli):
    code, out, _ = cli(["privacy", "epsilon", "--noise-multiplier", "2", "--sample-rate", "1", "--steps", "10"])
    assert code == 0 and out.startswith(f"epsilon {epsilon_spent(2.0, 1.0, 10, 1e-5):.4g} at delta 1e-05")
    code, _, err = cli(["privacy", "noise", "--epsilon", "0.05", "--sample-rate", "1", "--steps", "100"])
    assert code == 2 and err.count("\n") == 1
    assert "epsilon 0.05 at delta 1e-05 cannot be reached with 100 steps" in err


@pytest.mark.parametrize("bad", ["rho=-1", "accountant=gdp"])
def test_bad_dp_params_name_the_key(cli, tmp_path, bad):
    code, _, err = cli(["train", "family_relation", str(tmp_path / "x"), "--dp", "--param", bad])
    assert code == 2 and bad.split("=")[0] in err
