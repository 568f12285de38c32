"""Membership inference AUC, the public / private split, and a teacher read from a training output."""

from __future__ import annotations

import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.models.loader import LoadedModel
from expertkit.models.tiny import tiny_model, tiny_tokenizer
from expertkit.privacy.mia import auc_from_losses, example_losses, loss_threshold_mia
from expertkit.privacy.split import privacy_split
from expertkit.tasks.toy import lohi_task

TASK = lohi_task()


def test_auc_known_answers():
    # members 1, 3 against non-members 2, 4: of the four pairs, the member has the lower loss in three
    assert auc_from_losses([1.0, 3.0], [2.0, 4.0]).auc == 0.75
    assert auc_from_losses([0.1, 0.2], [0.5, 0.9]).auc == 1.0
    assert auc_from_losses([0.5, 0.9], [0.1, 0.2]).auc == 0.0
    assert auc_from_losses([1.0, 2.0], [1.0, 2.0]).auc == 0.5
    res = auc_from_losses([1.0, 3.0], [2.0, 4.0])
    assert (res.members, res.nonmembers, res.member_loss, res.nonmember_loss) == (2, 2, 2.0, 3.0)
    with pytest.raises(ConfigError, match="at least one member"):
        auc_from_losses([], [1.0])


def test_the_split_is_disjoint_deterministic_and_keeps_the_test_split():
    s = privacy_split(TASK, 20, 30, seed=3)
    assert len(s.public_examples) == 20 and len(s.private_examples) == 30
    drawn = TASK.examples("train", 50, 3)
    assert list(s.public_examples) + list(s.private_examples) == drawn  # one draw, cut in two: disjoint
    assert s.private.examples("train", 10, 99) == list(s.private_examples[:10])
    assert s.private.examples("test", 5, 1) == TASK.examples("test", 5, 1)
    assert (s.public.name, s.private.name) == ("lo-hi@public", "lo-hi@private")
    assert s.private.examples("train", 100, 0) == list(s.private_examples)  # a finite task gives what it has
    with pytest.raises(ConfigError, match="has 50 training examples; 20 public"):
        privacy_split(TASK.__class__(**{**TASK.__dict__, "build": lambda split, n, seed: drawn}), 20, 40)


def test_losses_are_trainings_and_a_memorising_model_is_caught(tmp_path):
    from expertkit.train import train_lora

    loaded = LoadedModel("tiny", tiny_model("llama", seed=0), tiny_tokenizer(), None, None)
    split = privacy_split(TASK, 4, 8, seed=0)
    members, nonmembers = list(split.private_examples), TASK.examples("test", 8, 0)
    before = loss_threshold_mia(loaded.model, loaded.tokenizer, TASK, members, nonmembers)
    out = tmp_path / "memorise"
    res = train_lora(loaded, split.private, out, steps=30, batch_size=8, lr=3e-2, rank=8, save_every=0,
                     target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    after = loss_threshold_mia(loaded.model, loaded.tokenizer, TASK, members, nonmembers, adapter=out)
    # the loss the attack reads is the training loss: the last full-batch step saw exactly the members
    last = example_losses(loaded.model, loaded.tokenizer, TASK, members, adapter=out)
    assert sum(last) / 8 < res.losses[-1]  # one more update after that step's loss was taken
    assert after.member_loss < before.member_loss
    assert after.auc > 0.8 > before.auc + 0.1  # 8 examples, 30 full-batch steps: memorised
    assert torch.equal(loaded.model.model.layers[0].self_attn.q_proj.weight,
                       tiny_model("llama", seed=0).model.layers[0].self_attn.q_proj.weight)  # adapter removed
