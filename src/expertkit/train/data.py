"""Training data: tokenized (prompt, target) rows, a seeded order, batches and the loss.

Each example becomes ``prompt_ids + target_ids + [eos]`` where the prompt is
``task.format_prompt(example)`` and the target ``task.target(example)``, encoded
exactly as evaluation encodes them (:mod:`expertkit.tasks.infer`). Labels are
``-100`` on the prompt and on padding, so the loss covers the target and EOS only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from expertkit.errors import ConfigError
from expertkit.tasks.base import Example, Task
from expertkit.tasks.infer import encode_continuations, encode_prompts, pad, pad_id_of

IGNORE = -100
Row = tuple[list[int], list[int]]  # (prompt ids, target ids + eos)


def encode_examples(tokenizer: Any, task: Task, examples: Sequence[Example], max_prompt_tokens: int) -> list[Row]:
    """Tokenize examples into ``(prompt_ids, target_ids + [eos])`` rows."""
    eos = getattr(tokenizer, "eos_token_id", None)
    prompts = encode_prompts(tokenizer, [task.format_prompt(e) for e in examples], max_prompt_tokens)
    targets = encode_continuations(tokenizer, [task.target(e) for e in examples])
    rows = []
    for p, t in zip(prompts, targets, strict=True):
        rows.append((p, t + ([int(eos)] if eos is not None else [])))
    if any(not t for _, t in rows):
        raise ConfigError(f"task '{task.name}': an example has an empty target and the tokenizer has no EOS.")
    return rows


def batch_indices(step: int, batch_size: int, pool: int, seed: int) -> list[int]:
    """Pool indices of the batch at 0-based ``step``.

    The pool is walked in epochs, each a fresh permutation seeded by ``(seed, epoch)``;
    batches run across epoch boundaries. A pure function of its arguments, so the data
    position of a resumed run is just its step.
    """
    out = []
    start = step * batch_size
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, pool)
        out.append(int(_permutation(pool, seed, epoch)[offset]))
    return out


_perm_cache: dict[tuple[int, int, int], torch.Tensor] = {}


def _permutation(pool: int, seed: int, epoch: int) -> torch.Tensor:
    key = (pool, seed, epoch)
    if key not in _perm_cache:
        if len(_perm_cache) > 64:
            _perm_cache.clear()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _perm_cache[key] = torch.randperm(pool, generator=gen)  # (pool,)
    return _perm_cache[key]


def collate(rows: Sequence[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``, each ``(batch, max_len)``."""
    ids, mask = pad([p + t for p, t in rows], pad_id, side="right")  # (B, L)
    labels = torch.full_like(ids, IGNORE)  # (B, L)
    for i, (p, t) in enumerate(rows):
        labels[i, len(p) : len(p) + len(t)] = torch.tensor(t, dtype=torch.long)
    return ids, mask, labels


def per_example_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy on the labelled tokens of each row: ``(batch,)``."""
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, L, V), or (B, P + L, V) with prompt tuning
    logits = logits[:, logits.shape[1] - ids.shape[1] :]  # (B, L, V): drop virtual-token positions
    shift_logits = logits[:, :-1].float()  # (B, L-1, V): position t predicts token t + 1
    shift_labels = labels[:, 1:]  # (B, L-1)
    tok = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none")  # (B, L-1)
    valid = (shift_labels != IGNORE).float()  # (B, L-1)
    return (tok * valid).sum(1) / valid.sum(1).clamp(min=1.0)  # (B,)


def make_loss_fn(model: Any, tokenizer: Any, rows: Sequence[Row]) -> Any:
    """A closure returning the per-example losses ``(batch,)`` of ``rows`` (see optimizers)."""
    ids, mask, labels = collate(rows, pad_id_of(tokenizer))

    def loss_fn() -> torch.Tensor:
        """Per-example losses ``(batch,)`` of the captured batch at the current parameters."""
        return per_example_loss(model, ids, mask, labels)

    return loss_fn
