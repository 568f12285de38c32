"""``select_n``: early stopping on validation inside train_lora (the adapter written is the best point)."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from expertkit.errors import ConfigError
from expertkit.models.loader import LoadedModel
from expertkit.models.tiny import tiny_model, tiny_tokenizer
from expertkit.tasks.toy import lohi_task
from expertkit.train import LoraTrainConfig, train_lora

TASK = lohi_task()
evaluation = importlib.import_module("expertkit.tasks.evaluate")  # the module (the package exports a function)
RUN = {"batch_size": 4, "rank": 4, "target_modules": ("q_proj", "v_proj"), "steps": 8, "save_every": 2,
       "train_examples": 32, "lr": 5e-3}  # the pool is fixed, so an 8-step run's first 4 steps are a 4-step run


def _loaded() -> LoadedModel:
    return LoadedModel("tiny", tiny_model("llama", seed=0), tiny_tokenizer(), None, None)


def _tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def scores(monkeypatch):
    """``scores(values)``: the validation accuracies the next scorings get, in order (step 0 first)."""
    queue: list[float] = []
    real = evaluation.evaluate

    def fake(model, tokenizer, task, *, split="test", n=100, **kw):
        if split != "validation":
            return real(model, tokenizer, task, split=split, n=n, **kw)
        assert n == 5
        torch.rand(3)  # a scoring that draws random numbers must not move training
        return SimpleNamespace(accuracy=queue.pop(0))

    monkeypatch.setattr(evaluation, "evaluate", fake)
    return queue.extend


def test_the_adapter_written_is_the_point_best_on_validation(tmp_path, scores) -> None:
    scores([0.1, 0.5, 0.9, 0.9, 0.3])  # steps 0, 2, 4, 6, 8: step 4 (6 ties it, later)
    res = train_lora(_loaded(), TASK, tmp_path / "sel", select_n=5, **RUN)
    meta = json.loads((tmp_path / "sel" / "expertkit.json").read_text())
    assert meta["selection"] == {"split": "validation", "n": 5, "step": 4,
                                 "curve": [[0, 0.1], [2, 0.5], [4, 0.9], [6, 0.9], [8, 0.3]]}
    assert len(res.losses) == 8  # the whole run was trained; only the weights written are step 4's
    train_lora(_loaded(), TASK, tmp_path / "four", **{**RUN, "steps": 4})
    assert _same(_tensors(tmp_path / "sel"), _tensors(tmp_path / "four"))
    scores([0.1, 0.2, 0.3, 0.4, 0.5])  # the last step is best: the plain run's adapter
    train_lora(_loaded(), TASK, tmp_path / "last", select_n=5, **RUN)
    train_lora(_loaded(), TASK, tmp_path / "plain", **RUN)
    assert _same(_tensors(tmp_path / "last"), _tensors(tmp_path / "plain"))
    assert not _same(_tensors(tmp_path / "sel"), _tensors(tmp_path / "plain"))


def test_an_interrupted_selection_resumes_to_the_same_choice(tmp_path, scores, interrupt_at) -> None:
    scores([0.2, 0.6, 0.4])  # steps 0, 2, 4; interrupted after step 5
    with pytest.raises(KeyboardInterrupt):
        train_lora(_loaded(), TASK, tmp_path / "cut", select_n=5, callbacks=[interrupt_at(5)], **RUN)
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoint").glob("best-step-*"))
    assert kept == ["best-step-000002.safetensors"]  # the best point so far, and only it
    scores([0.5, 0.1])  # steps 6 and 8
    train_lora(_loaded(), TASK, tmp_path / "cut", select_n=5, **RUN)
    scores([0.2, 0.6, 0.4, 0.5, 0.1])
    train_lora(_loaded(), TASK, tmp_path / "whole", select_n=5, **RUN)
    a, b = (json.loads((tmp_path / f / "expertkit.json").read_text()) for f in ("cut", "whole"))
    assert a["selection"] == b["selection"] and a["selection"]["step"] == 2
    assert _same(_tensors(tmp_path / "cut"), _tensors(tmp_path / "whole"))
    assert not (tmp_path / "cut" / "checkpoint").exists()  # the finished adapter replaced the folder


def test_scoring_on_validation_does_not_move_training(tmp_path) -> None:
    """Real scoring (no fake): the losses are those of a run without selection; scores are accuracies."""
    res = train_lora(_loaded(), TASK, tmp_path / "sel", select_n=5, **RUN)
    plain = train_lora(_loaded(), TASK, tmp_path / "plain", **RUN)
    assert res.losses == plain.losses
    curve = res.meta["selection"]["curve"]
    assert [s for s, _ in curve] == [0, 2, 4, 6, 8] and all(0.0 <= a <= 1.0 for _, a in curve)
    best = max(curve, key=lambda p: (p[1], -p[0]))
    assert res.meta["selection"]["step"] == best[0]


def test_selection_needs_checkpoints_and_leaves_old_identities_alone() -> None:
    with pytest.raises(ConfigError, match="save_every above 0"):
        train_lora(_loaded(), TASK, "unused", select_n=5, **{**RUN, "save_every": 0})
    assert "select_n" not in LoraTrainConfig().training_fields()  # experts trained before it are still finished
    assert LoraTrainConfig(select_n=5).training_fields()["select_n"] == 5


def test_the_train_experts_stage_takes_select_n() -> None:
    from expertkit.pipeline.stages.experts import TrainExpertsParams

    params = TrainExpertsParams(tasks=["leap_year"], train={"select_n": 50, "save_every": 10})
    assert params.train.select_n == 50
    with pytest.raises(ValueError, match="save_every above 0"):
        TrainExpertsParams(tasks=["leap_year"], train={"select_n": 50, "save_every": 0})


def test_with_dp_sgd_the_choice_is_on_validation_and_the_privacy_report_is_unchanged(tmp_path) -> None:
    """The validation split is not the private training data: choosing on it spends no privacy, and the
    DP run itself (its batches, noise and accounting) is the same as without the choice."""
    from expertkit.cli.train_cmd import dp_settings

    opt, params = dp_settings("adamw", True, {}, epsilon=8.0, delta=None, max_grad_norm=None,
                              noise_multiplier=None, accountant=None)
    run = {**RUN, "steps": 4, "optimizer": opt, "optimizer_params": params}
    sel = train_lora(_loaded(), TASK, tmp_path / "sel", select_n=5, **run)
    plain = train_lora(_loaded(), TASK, tmp_path / "plain", **run)
    assert sel.losses == plain.losses and sel.meta["optimizer_report"] == plain.meta["optimizer_report"]
    assert [s for s, _ in sel.meta["selection"]["curve"]] == [0, 2, 4]


@pytest.mark.parametrize("scheme,optimizer", [("prompt", "zo-sgd"), ("prefix", "adamw"), ("full", "zo-adam"),
                                              ("lora", "forward-grad")])
def test_every_scheme_and_kind_of_optimizer_takes_select_n(tmp_path, scores, scheme, optimizer) -> None:
    run = {"optimizer": optimizer, "scheme": scheme, "steps": 4, "save_every": 2, "batch_size": 4,
           "train_examples": 32}
    scores([0.1, 0.9, 0.2])  # steps 0, 2, 4: step 2
    sel = train_lora(_loaded(), TASK, tmp_path / "sel", select_n=5, **run)
    two = train_lora(_loaded(), TASK, tmp_path / "two", **{**run, "steps": 2})
    assert sel.meta["selection"]["step"] == 2
    weights = "model.safetensors" if scheme == "full" else "adapter_model.safetensors"
    a, b = (load_file(tmp_path / f / weights) for f in ("sel", "two"))
    assert _same(a, b)


def test_a_scoring_that_draws_random_numbers_does_not_move_a_run_with_dropout(tmp_path, scores) -> None:
    run = {**RUN, "dropout": 0.1}  # dropout draws from the global stream the scoring would move
    scores([0.1, 0.2, 0.3, 0.4, 0.5])
    sel = train_lora(_loaded(), TASK, tmp_path / "sel", select_n=5, **run)
    plain = train_lora(_loaded(), TASK, tmp_path / "plain", **run)
    assert sel.losses == plain.losses
