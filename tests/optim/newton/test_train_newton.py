"""``newton`` / ``q-newton`` in the training loop: registry, train_lora on LoRA + head, resume, CLI, pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from expertkit.errors import ConfigError
from expertkit.optim.newton import NOTICE, NewtonParams
from expertkit.train import OPTIMIZERS, build_optimizer, train_lora
from tests.train.conftest import _interrupt_at

LORA_AND_HEAD = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"], "batch_size": 8,
                 "lr": 1.0, "seed": 0}


def test_both_methods_are_registered_with_their_parameters() -> None:
    for name in ("newton", "q-newton"):
        entry = OPTIMIZERS.entry(name)
        assert entry.params is NewtonParams and entry.extra["second_order"]
    assert "MODELLED" in OPTIMIZERS.entry("q-newton").summary
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ConfigError, match="curvature"):
        build_optimizer("q-newton", [p], lr=1.0, steps=1, seed=0, hparams={"curvture": "hessian"})
    with pytest.raises(ConfigError, match="model="):
        opt = build_optimizer("newton", [p], lr=1.0, steps=1, seed=0, hparams={"verbose": False})
        opt.step(lambda: (p * p).sum().reshape(1) + 1, 1.0)


def test_q_newton_trains_lora_and_head_and_logs_every_decision(tiny_checkpoint, tmp_path, capsys) -> None:
    from expertkit.models import load_model

    log = tmp_path / "decisions.jsonl"
    params = {"row_keep": 0.25, "gate_time": 1e-15, "log_path": str(log)}
    res = train_lora(load_model(str(tiny_checkpoint("llama"))), "leap_year", tmp_path / "qn", steps=3,
                     optimizer="q-newton", optimizer_params=params, save_every=0, **LORA_AND_HEAD)
    assert NOTICE in " ".join(capsys.readouterr().err.split())
    assert res.losses[-1] < res.losses[0]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    steps = [x for x in lines if x["type"] == "step"]
    decisions = [x for x in lines if x["type"] == "decision"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert sum(s["solves"] for s in steps) == len(decisions) > 0
    blocks = {d["block"] for d in decisions}
    assert any("lm_head" in b for b in blocks) and any("q_proj" in b for b in blocks)
    for d in decisions:
        assert {"kappa", "kappa_q", "d", "alpha", "predicted_s", "chosen", "reason"} <= set(d)
        assert set(d["predicted_s"]) == {"cholesky", "cg", "quantum"}
        assert d["chosen"] == min(d["predicted_s"], key=d["predicted_s"].get)
        if d["chosen"] == "quantum":
            assert "ran classically" in d["reason"] and d["d"] <= max(1, d["n"] // 4)
    assert any(d["chosen"] == "quantum" for d in decisions)  # at a femtosecond gate some solves go quantum


def test_newton_resumes_identically(tiny_checkpoint, tmp_path) -> None:
    from expertkit.models import load_model

    base = load_model(str(tiny_checkpoint("llama")))
    kw = {**LORA_AND_HEAD, "steps": 4, "save_every": 2, "optimizer": "newton",
          "optimizer_params": {"verbose": False, "curvature": "fisher"}}
    train_lora(base, "leap_year", tmp_path / "straight", **kw)
    with pytest.raises(KeyboardInterrupt):
        train_lora(base, "leap_year", tmp_path / "resumed", callbacks=[_interrupt_at(2)], **kw)
    res = train_lora(base, "leap_year", tmp_path / "resumed", **kw)
    assert res.resumed_from == 2
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_trains_with_q_newton_and_says_the_solver_is_modelled(tiny_checkpoint, tmp_path, cli) -> None:
    out = tmp_path / "expert"
    code, stdout, err = cli(
        ["--quiet", "train", "leap_year", str(out), "--model", str(tiny_checkpoint("llama")), "--optimizer",
         "q-newton", "--steps", "2", "--batch-size", "4", "--rank", "2", "--lr", "0.5",
         "--param", "row_keep=0.5"])
    assert code == 0, err
    assert "trained 2 steps" in stdout and "cost model" in err and "runs classically" in err
    meta = json.loads((out / "expertkit.json").read_text())
    assert meta["optimizer"] == "q-newton" and meta["config"]["optimizer_params"] == {"row_keep": 0.5}
    code, _, err = cli(["train", "leap_year", str(tmp_path / "b"), "--optimizer", "q-newton",
                        "--param", "row_kep=0.5"])
    assert code == 2 and "row_keep" in err and "Traceback" not in err


def test_pipeline_stage_passes_the_optimizer_through() -> None:
    from expertkit.pipeline import parse_run_config

    stage = {"kind": "train_experts", "tasks": ["leap_year"],
             "train": {"optimizer": "q-newton", "optimizer_params": {"row_keep": 0.5}, "lr": 1.0}}
    parsed = parse_run_config({"name": "qn", "model": "smollm2-135m", "stages": [stage]})
    train = parsed.stages[0].params.train
    assert train.optimizer == "q-newton" and train.optimizer_params == {"row_keep": 0.5}
    bad = {**stage, "train": {**stage["train"], "optimizer_params": {"row_kep": 0.5}}}
    with pytest.raises(ConfigError, match="row_keep"):
        parse_run_config({"name": "qn", "model": "smollm2-135m", "stages": [bad]})


def test_transformer_hessian_block_matches_finite_differences(tiny_checkpoint) -> None:
    """SiLU and attention inside the closure: the curvlinops Hessian of one LoRA factor vs central differences."""
    from expertkit.models import load_model
    from expertkit.optim.newton.curvature import closure_problem, dense_matrix, forward_ad_friendly, operator
    from expertkit.train.config import LoraTrainConfig
    from expertkit.train.data import encode_examples, make_loss_fn
    from expertkit.train.schemes import wrap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    loaded = load_model(str(tiny_checkpoint("llama")))
    loaded.model.double()  # the loss itself is float32 (per_example_loss upcasts logits with .float())
    torch.manual_seed(0)
    model, give_back = wrap(loaded.model, LoraTrainConfig(rank=1, target_modules=("layers.1.mlp.up_proj",)), None)
    model.double()
    try:
        task = __import__("expertkit.tasks.base", fromlist=["get_task"]).get_task("leap_year")
        rows = encode_examples(loaded.tokenizer, task, task.examples("train", 4, 0), 64)
        loss_fn = make_loss_fn(model, loaded.tokenizer, rows)
        a, b = [p for n, p in model.named_parameters() if p.requires_grad]  # lora_A (1, 64), lora_B (h, 1)
        with torch.no_grad():
            b.normal_(0, 0.5)  # B = 0 at init would make A's Hessian block 0
        with sdpa_kernel([SDPBackend.MATH]), forward_ad_friendly():
            H = dense_matrix(operator("hessian", closure_problem(model, loss_fn, 4, torch.get_rng_state()), [a]))

        def grad() -> torch.Tensor:
            return torch.autograd.grad(loss_fn().mean(), [a])[0].reshape(-1).double()

        h, cols = 1e-3, [0, 7, 33]
        for j in cols:
            with torch.no_grad():
                a.view(-1)[j] += h
            up = grad()
            with torch.no_grad():
                a.view(-1)[j] -= 2 * h
            down = grad()
            with torch.no_grad():
                a.view(-1)[j] += h
            fd = (up - down) / (2 * h)  # (64,)
            assert torch.allclose(H[:, j], fd, atol=1e-3 * float(fd.abs().max()))
        assert float(H.abs().max()) > 0
    finally:
        give_back()
