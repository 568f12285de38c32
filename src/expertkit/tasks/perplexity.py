"""Held-out perplexity: BBC News articles of a split, cut into token blocks, scored block by block.

:func:`heldout_blocks` gives the same ``(n_blocks, seq_len)`` token blocks for every model that
shares a tokenizer (articles of the ``bbc_topic`` task's split in a fixed order, joined by EOS).
:func:`block_nll` returns the mean next-token negative log-likelihood of each block, so two models
can be compared block by block (paired), and :func:`perplexity` their pooled perplexity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from expertkit.errors import ConfigError


def heldout_blocks(tokenizer: Any, *, split: str = "test", seq_len: int = 128, n_blocks: int = 64) -> torch.Tensor:
    """``(n_blocks, seq_len)`` token ids of BBC News articles of ``split`` (never the train split)."""
    from expertkit.tasks.bbc import split_articles

    if split == "train":
        raise ConfigError("held-out perplexity must not use the train split (experts and MoEs train on it).")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for items in split_articles(split).values():
        for _, text in items:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
            if len(ids) >= n_blocks * seq_len:
                break
        if len(ids) >= n_blocks * seq_len:
            break
    if len(ids) < n_blocks * seq_len:
        raise ConfigError(f"the {split} articles hold {len(ids)} tokens, fewer than {n_blocks} x {seq_len}.")
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


@torch.no_grad()
def block_nll(model: Any, blocks: torch.Tensor, *, batch_size: int = 8) -> list[float]:
    """Mean next-token negative log-likelihood (nats) of each block under ``model``."""
    from expertkit.progress import track

    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in track(range(0, blocks.shape[0], batch_size), "Perplexity"):
            ids = blocks[start:start + batch_size]  # (B, T)
            logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
            out.extend(nll.mean(1).tolist())
    finally:
        model.train(was_training)
    return out


def perplexity(nll: list[float]) -> float:
    """Perplexity of equally long blocks from their mean NLLs."""
    return math.exp(sum(nll) / len(nll))
