"""Membership inference by a loss threshold (Yeom et al., CSF 2018): does the model leak its data?

The attacker scores each example by minus its loss under the trained model (training examples
tend to have lower loss) and picks a threshold; the attack's AUC over all thresholds
(``sklearn.metrics.roc_auc_score``) on the private training examples (members) against held-out
examples of the same distribution (non-members) is the reported leakage: 0.5 is chance, 1.0 a
perfect attack. DP bounds it: with (ε, δ)-DP the true-positive rate is at most
``e^ε * FPR + δ`` at every threshold.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.tasks.base import Example, Task


@dataclass(frozen=True)
class MiaResult:
    """A loss-threshold attack's outcome."""

    auc: float
    members: int
    nonmembers: int
    member_loss: float  # mean loss on members
    nonmember_loss: float

    def as_dict(self) -> dict[str, float]:
        """JSON-able fields."""
        return {"auc": self.auc, "members": self.members, "nonmembers": self.nonmembers,
                "member_loss": self.member_loss, "nonmember_loss": self.nonmember_loss}


def auc_from_losses(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> MiaResult:
    """The attack's AUC from per-example losses (score = -loss; members are the positives)."""
    from sklearn.metrics import roc_auc_score

    if not member_losses or not nonmember_losses:
        raise ConfigError("membership inference needs at least one member and one non-member example.")
    labels = [1] * len(member_losses) + [0] * len(nonmember_losses)
    scores = [-float(x) for x in member_losses] + [-float(x) for x in nonmember_losses]
    return MiaResult(float(roc_auc_score(labels, scores)), len(member_losses), len(nonmember_losses),
                     sum(member_losses) / len(member_losses), sum(nonmember_losses) / len(nonmember_losses))


def example_losses(model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], *,
                   adapter: str | os.PathLike[str] | None = None, batch_size: int = 16,
                   max_prompt_tokens: int = 256) -> list[float]:
    """Per-example training losses (mean target-token cross-entropy) of ``examples`` under ``model``
    (with a PEFT ``adapter`` folder applied when given), exactly as training computes them."""
    from expertkit.tasks.evaluate import with_adapter
    from expertkit.tasks.infer import pad_id_of
    from expertkit.train.data import collate, encode_examples, per_example_loss

    rows = encode_examples(tokenizer, task, examples, max_prompt_tokens)
    out: list[float] = []
    with with_adapter(model, adapter) as runner, torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            ids, mask, labels = collate(rows[start:start + batch_size], pad_id_of(tokenizer))  # (b, L) each
            out.extend(float(x) for x in per_example_loss(runner, ids, mask, labels))
    return out


def loss_threshold_mia(model: Any, tokenizer: Any, task: Task, members: Sequence[Example],
                       nonmembers: Sequence[Example], **kw: Any) -> MiaResult:
    """Loss-threshold membership inference: AUC of members (training data) against non-members."""
    return auc_from_losses(example_losses(model, tokenizer, task, members, **kw),
                           example_losses(model, tokenizer, task, nonmembers, **kw))
