"""A causal language model's answer tokens as a curvature :class:`~.curvature.Problem` (GGN included).

The training loop hands an optimizer per-example losses only, and the generalized Gauss-Newton
matrix needs the model's outputs and a loss module. :func:`answer_problem` gives both for a fixed
batch ``(input_ids, attention_mask, labels)`` as built by :func:`expertkit.train.data.collate`:
the "model" returns the logits at the labelled positions only, ``(T, vocab)`` for the ``T``
answer tokens of the batch, and the loss is their mean cross-entropy. With every row's answer of
the same length this is exactly the training loss (mean over rows of each row's mean token loss,
:func:`expertkit.train.data.per_example_loss`); rows of different lengths are refused, since
the token mean would weight them differently. The GGN of the cross-entropy is then
``(1/T) Σ_t J_tᵀ (diag p_t - p_t p_tᵀ) J_t`` with ``J_t`` the Jacobian of token t's logits:
positive semi-definite, and, unlike the empirical Fisher ``(1/B) Σ_i ∇ℓ_i ∇ℓ_iᵀ`` (rank at most
the batch size), of rank up to ``T (vocab - 1)``.
"""

from __future__ import annotations

from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.optim.newton.curvature import Problem

IGNORE = -100


class AnswerLogits(torch.nn.Module):
    """``forward(X) -> (T, vocab)``: the logits predicting each labelled token of the captured batch."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.ids, self.mask = ids, mask  # (B, L) each
        self.positions = labels[:, 1:] != IGNORE  # (B, L-1): position t predicts token t + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(T, vocab)`` at the answer positions (``x`` only sets the token count)."""
        logits = self.model(input_ids=self.ids, attention_mask=self.mask).logits  # (B, L, V)
        logits = logits[:, logits.shape[1] - self.ids.shape[1]:]  # (B, L, V) without virtual tokens
        out = logits[:, :-1][self.positions]  # (T, V)
        return out if out.dtype == torch.float64 else out.float()


def answer_problem(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> Problem:
    """A :class:`Problem` whose loss is the mean cross-entropy of the answer tokens (see the module doc)."""
    valid = labels[:, 1:] != IGNORE  # (B, L-1)
    lengths = valid.sum(1)  # (B,)
    if int(lengths.min()) == 0:
        raise ConfigError("a row of the batch has no labelled token; the answer-token problem needs one per row.")
    if int(lengths.max()) != int(lengths.min()):
        raise ConfigError(
            f"answer lengths differ across the batch ({int(lengths.min())} to {int(lengths.max())} tokens): the "
            "token-mean cross-entropy of answer_problem would weight rows unlike the training loss; use equal-length "
            "answers or the closure curvatures ('fisher', 'hessian').")
    target = labels[:, 1:][valid]  # (T,)
    X = torch.zeros(int(target.numel()), 1)  # (T, 1) placeholder: one row per answer token
    return Problem(AnswerLogits(model, ids, mask, labels), torch.nn.CrossEntropyLoss(), X, target)
