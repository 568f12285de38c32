"""Calibration data: general text blocks and task prompts, as padded token batches.

* Text: ``text_blocks`` blocks of ``seq_len`` tokens of BBC News articles of the ``validation`` split
  (never ``test``, which held-out perplexity is measured on; the MoE's experts trained on ``train``),
  from :func:`expertkit.tasks.perplexity.heldout_blocks`.
* Prompts: ``prompts_per_task`` formatted prompts of each suite task (the split given), so that the
  experts specialised on those tasks get routed tokens; right-padded, padding masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from expertkit.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


def calibration_batches(tokenizer: Any, *, text_blocks: int = 32, seq_len: int = 128, tasks: Sequence[str] = (),
                        prompts_per_task: int = 16, split: str = "validation", batch_size: int = 8,
                        max_prompt_tokens: int = 256, seed: int = 0) -> list[Batch]:
    """``[(input_ids (B, T), attention_mask (B, T)), ...]`` of text blocks then task prompts."""
    from expertkit.tasks.infer import encode_prompts, pad, pad_id_of

    if tokenizer is None:
        raise ConfigError("calibration needs the model's tokenizer; the model folder has none.")
    if split == "test":
        raise ConfigError("calibration must not use the test split (results are measured on it); use validation.")
    if text_blocks < 0 or prompts_per_task < 0 or batch_size < 1:
        raise ConfigError("text_blocks and prompts_per_task must be >= 0 and batch_size >= 1.")
    batches: list[Batch] = []
    if text_blocks:
        from expertkit.tasks.perplexity import heldout_blocks

        blocks = heldout_blocks(tokenizer, split=split, seq_len=seq_len, n_blocks=text_blocks)  # (n, T)
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size]
            batches.append((ids, torch.ones_like(ids)))
    if tasks and prompts_per_task:
        from expertkit.moe.collect import task_prompts

        prompts = [p for group in task_prompts(list(tasks), prompts_per_task, split, seed).values() for p in group]
        pad_id = pad_id_of(tokenizer)
        for start in range(0, len(prompts), batch_size):
            ids = encode_prompts(tokenizer, prompts[start:start + batch_size], max_prompt_tokens)
            batches.append(pad(ids, pad_id, side="right"))
    if not batches:
        raise ConfigError("the calibration set is empty: set text_blocks > 0 or give tasks with prompts_per_task > 0.")
    return batches


def count_tokens(batches: Sequence[Batch]) -> int:
    """Real (unpadded) tokens in ``batches``."""
    return int(sum(int(mask.sum()) for _, mask in batches))
