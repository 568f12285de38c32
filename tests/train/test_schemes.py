"""Fine-tuning schemes (LoRA, full, prefix, prompt) with zeroth-order optimizers through train_lora."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from expertkit.models.loader import LoadedModel, load_model
from expertkit.models.tiny import tiny_model, tiny_tokenizer
from expertkit.tasks.toy import lohi_task
from expertkit.train import LoraTrainConfig, train_lora
from expertkit.train.data import per_example_loss
from expertkit.train.lora import config_scheme

CLASSIFY = lohi_task()
FAST = {"batch_size": 4, "rank": 4, "target_modules": ("q_proj", "v_proj"), "save_every": 0}


def fresh() -> LoadedModel:
    return LoadedModel("tiny", tiny_model("llama", seed=0), tiny_tokenizer(), None, None)


def state_bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.int32) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scheme,files,trainable", [
    ("lora", ["adapter_config.json", "adapter_model.safetensors"], 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)),  # 2 layers; v_proj is 64 -> 32 (GQA)
    ("prefix", ["adapter_config.json", "adapter_model.safetensors"], 3 * 2 * 2 * 32),  # tokens x layers x (k, v) x kv dim
    ("prompt", ["adapter_config.json", "adapter_model.safetensors"], 3 * 64),
    ("full", ["config.json", "model.safetensors"], None),
])
def test_every_scheme_trains_with_zo_and_gives_the_base_back(tmp_path, scheme, files, trainable) -> None:
    lm = fresh()
    before = state_bits(lm.model)
    flags = [p.requires_grad for p in lm.model.parameters()]
    res = train_lora(lm, CLASSIFY, tmp_path / scheme, steps=2, lr=1e-3, scheme=scheme, num_virtual_tokens=3,
                     optimizer="zo-sgd", optimizer_params={"eps": 1e-2}, **FAST)
    for f in files + ["expertkit.json"]:
        assert (tmp_path / scheme / f).is_file(), f
    meta = json.loads((tmp_path / scheme / "expertkit.json").read_text())
    n_all = sum(p.numel() for p in lm.model.parameters())
    assert meta["trainable_params"] == (trainable if trainable is not None else n_all)
    assert meta["scheme"] == config_scheme(meta) == scheme and len(res.losses) == 2
    after = state_bits(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is unchanged
    assert [p.requires_grad for p in lm.model.parameters()] == flags


def test_full_scheme_writes_a_loadable_model_that_moved(tmp_path, tiny_checkpoint) -> None:
    folder = tiny_checkpoint("llama")
    lm = load_model(folder)
    train_lora(lm, CLASSIFY, tmp_path / "full", steps=2, lr=1e-2, scheme="full", optimizer="zo-sgd", **FAST)
    trained = load_model(tmp_path / "full").model.state_dict()
    base = lm.model.state_dict()  # restored from the folder after training
    assert torch.equal(base["model.norm.weight"], load_file(folder / "model.safetensors")["model.norm.weight"])
    moved = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(moved) > len(base) // 2


def test_lora_identity_unchanged_by_new_fields() -> None:
    fields = LoraTrainConfig().training_fields()
    assert "scheme" not in fields and "num_virtual_tokens" not in fields  # old experts stay reusable
    assert LoraTrainConfig(scheme="prefix").training_fields()["scheme"] == "prefix"


def test_prefix_init_identity_only_for_prefix_tuning() -> None:
    assert "prefix_init" not in LoraTrainConfig().training_fields()  # LoRA experts keep their identity
    assert LoraTrainConfig(scheme="prefix").training_fields()["prefix_init"] == "real"
    assert LoraTrainConfig(scheme="prefix", prefix_init="random").training_fields()["prefix_init"] == "random"


def test_real_prefix_init_equals_the_model_reading_those_tokens_first() -> None:
    """Known answer: a prefix of the model's own keys/values of T tokens makes the PEFT model's logits on
    x equal the plain model's logits on [those T tokens, x] at x's positions."""
    from expertkit.train.schemes import real_prefix, wrap

    lm = fresh()
    x = torch.tensor([[5, 17, 33, 2, 40, 8]])  # (1, S)
    cfg = LoraTrainConfig(scheme="prefix", num_virtual_tokens=4, seed=3)
    ids, _ = real_prefix(lm.model, 4, 3)
    with torch.no_grad():
        want = lm.model(input_ids=torch.cat([ids[None], x], 1)).logits[:, 4:]  # (1, S, V)
    peft_model, give_back = wrap(lm.model, cfg, None)
    peft_model.eval()
    with torch.no_grad():
        got = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -x.shape[1]:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    give_back()
    random_model, give_back = wrap(lm.model, cfg.model_copy(update={"prefix_init": "random"}), None)
    with torch.no_grad():  # PEFT's random start is far from it
        far = random_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -x.shape[1]:]
    assert (far - want).abs().max() > 1e-2
    give_back()


def test_loss_ignores_virtual_token_positions() -> None:
    class Shifted(torch.nn.Module):
        """Logits with 2 extra leading positions, as prompt tuning returns them."""

        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            junk = torch.full((input_ids.shape[0], 2, self.logits.shape[-1]), 9.0)
            return type("Out", (), {"logits": torch.cat([junk, self.logits], 1)})

    class Plain(Shifted):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.logits})

    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 7, (2, 5))
    labels = ids.clone()
    labels[:, :2] = -100
    mask = torch.ones_like(ids)
    torch.testing.assert_close(per_example_loss(Shifted(logits), ids, mask, labels),
                               per_example_loss(Plain(logits), ids, mask, labels))


def test_zo_training_lowers_the_loss(tmp_path) -> None:
    res = train_lora(fresh(), CLASSIFY, tmp_path / "a", steps=24, lr=1e-2, batch_size=16, optimizer="zo-adam",
                     optimizer_params={"eps": 1e-2}, target_modules=("q_proj", "v_proj", "lm_head"), save_every=0)
    assert sum(res.losses[-4:]) / 4 < sum(res.losses[:4]) / 4 - 0.1


@pytest.mark.parametrize("optimizer,params", [
    ("zo-adam", {"sparsity": 0.5, "mask_every": 2, "q": 2}),
    ("zo-sgd-mmt", {"block": "layer", "estimator": "one-sided"}),
])
def test_zo_resume_after_interrupt_gives_identical_adapter(tmp_path, optimizer, params, interrupt_at) -> None:
    cfg = LoraTrainConfig(steps=4, lr=1e-3, batch_size=4, rank=4, dropout=0.1, save_every=2, optimizer=optimizer,
                          optimizer_params=params, train_examples=10)
    full = train_lora(fresh(), CLASSIFY, tmp_path / "full", cfg)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_lora(fresh(), CLASSIFY, out, cfg, callbacks=[interrupt_at(3)])
    res = train_lora(fresh(), CLASSIFY, out, cfg)
    assert res.resumed_from == 2 and res.losses == full.losses
    a, b = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "full" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
