"""Batched model inference shared by evaluation and training.

Tokenization rule, used identically by training and evaluation: the prompt is
encoded on its own (with the tokenizer's default special tokens, e.g. a BOS),
the target ``" " + answer`` on its own without special tokens, and the two id
lists are concatenated. Encoding them apart keeps the prompt's ids the same
whichever answer follows, so per-choice log-likelihoods compare like with like.

* :func:`choice_logprobs`: sum of log-probabilities of each continuation after
  its prompt, batched with right padding (positions stay ``0..len-1``).
* :func:`shared_prefix_logprobs`: the same numbers with each prompt run once and its
  KV cache shared by all of its continuations (what evaluation uses); prompt-tuned
  PEFT models fall back to :func:`choice_logprobs` (their virtual tokens defeat the cache).
* :func:`greedy_generate`: greedy generation with left padding (prompt-tuned PEFT models
  generate from embeddings with their virtual tokens put in); generation stops
  early once every row has finished a line (or produced EOS), and each
  prediction is the first non-empty line of the new text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.progress import track


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each prompt (default special tokens), keeping the last ``max_tokens`` ids.

    An empty encoding is an error: a continuation needs at least one prompt token to follow.
    """
    out = []
    for prompt, ids in zip(prompts, tokenizer(list(prompts)).input_ids, strict=True):
        ids = list(ids)
        if max_tokens is not None and len(ids) > max_tokens:
            ids = ids[-max_tokens:]  # keep the end: it holds the question
        if not ids:
            raise ConfigError(f"prompt {prompt!r} encodes to no tokens; prompts must be non-empty.")
        out.append(ids)
    return out


def encode_continuations(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each continuation (e.g. ``" " + answer``), without special tokens."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]


def pad_id_of(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else EOS, else 0 (always masked out)."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def pad(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length on ``side`` ("left" or "right").

    Returns ``(input_ids, attention_mask)``, both ``(batch, max_len)`` int64, the mask 1 on real tokens.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (batch, max_len)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (batch, max_len)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def choice_logprobs(
    model: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    *,
    batch_size: int = 16,
    description: str = "Scoring",
) -> list[float]:
    """Sum of log p(continuation | prompt) for each ``(prompt_ids, continuation_ids)`` pair.

    Pairs are sorted by length and run ``batch_size`` at a time with right padding;
    results come back in the input order. An empty continuation scores 0.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    out = [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for batch in track(_batches(order, batch_size), description):
        seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in batch]
        ids, mask = pad(seqs, pad_id, side="right")  # (B, L) each
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, L, V), or (B, P + L, V)
        logits = logits[:, logits.shape[1] - ids.shape[1] :]  # (B, L, V): drop prompt tuning's virtual tokens
        # position t predicts token t + 1
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, L-1, V)
        tok_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
        for row, i in enumerate(batch):
            p_len, c_len = len(pairs[i][0]), len(pairs[i][1])
            out[i] = float(tok_lp[row, p_len - 1 : p_len - 1 + c_len].sum())
    return out


def prepends_virtual_tokens(model: Any) -> bool:
    """Whether ``model`` is a PEFT prompt-tuning-like model (virtual tokens put before the input).

    Such a forward returns ``P`` extra leading logits, ignores ``position_ids`` and prepends
    the virtual tokens again on every call, so a cached continuation cannot be scored with it.
    Prefix tuning (trained keys and values, no extra positions) is not one.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return False
    return str(getattr(config.peft_type, "value", config.peft_type)) != "PREFIX_TUNING"


def _forward_last(model: Any, **inputs: Any) -> Any:
    """Forward asking for last-position logits only when the model supports it."""
    try:
        return model(**inputs, logits_to_keep=1)
    except TypeError:  # a model without ``logits_to_keep``: full logits
        return model(**inputs)


@torch.inference_mode()
def shared_prefix_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    *,
    batch_size: int = 16,
    description: str = "Scoring",
) -> list[list[float]]:
    """Summed log p(continuation | prompt) for every continuation of every prompt, prompt run once.

    ``continuations[i]`` are the candidate id lists for ``prompts[i]``. Each batch of
    ``batch_size`` prompts runs once, left-padded with explicit position ids, keeping its
    KV cache; the first continuation token is scored from the last prompt position. The
    remaining tokens of all multi-token continuations then run in one forward over the
    cache rows of their prompts (right-padded). Equals :func:`choice_logprobs` on
    ``(prompt, continuation)`` pairs, at about ``1 / n_choices`` of the prompt cost.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    if prepends_virtual_tokens(model):  # its forward re-inserts them before any cached tokens: no sharing
        pairs = [(p, c) for p, cs in zip(prompts, continuations, strict=True) for c in cs]
        flat = iter(choice_logprobs(model, pairs, pad_id, batch_size=batch_size, description=description))
        return [[next(flat) for _ in cs] for cs in continuations]
    out: list[list[float]] = [[0.0] * len(c) for c in continuations]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for batch in track(_batches(order, batch_size), description):
        ids, mask = pad([prompts[i] for i in batch], pad_id, side="left")  # (B, Lp)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, Lp): real tokens at 0..len-1
        res = _forward_last(model, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        first = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # (B, V)
        rows = []  # (batch row, example, choice) of continuations longer than one token
        for b, i in enumerate(batch):
            for j, cont in enumerate(continuations[i]):
                if cont:
                    out[i][j] = float(first[b, cont[0]])
                if len(cont) > 1:
                    rows.append((b, i, j))
        if not rows:
            continue
        cache = res.cache  # transformers 5: ``cache`` (formerly ``past_key_values``)
        cache.reorder_cache(torch.tensor([b for b, _, _ in rows]))  # (R, ...) one cache row per continuation
        feed = [list(continuations[i][j][:-1]) for _, i, j in rows]  # tokens fed; they predict cont[1:]
        cont_ids, cont_mask = pad(feed, pad_id, side="right")  # (R, Lc)
        row_b = torch.tensor([b for b, _, _ in rows])  # (R,)
        full_mask = torch.cat([mask[row_b], cont_mask], dim=1)  # (R, Lp + Lc)
        cont_pos = mask[row_b].sum(1, keepdim=True) + torch.arange(cont_ids.shape[1])  # (R, Lc)
        logits = model(
            input_ids=cont_ids, attention_mask=full_mask, position_ids=cont_pos, cache=cache, use_cache=True,
        ).logits.float()  # (R, Lc, V)
        logp = torch.log_softmax(logits, dim=-1)  # (R, Lc, V)
        for r, (_, i, j) in enumerate(rows):
            targets = torch.tensor(continuations[i][j][1:])  # (Lc_r,)
            out[i][j] += float(logp[r, : len(targets)].gather(-1, targets[:, None]).sum())
    return out


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped ("" when there is none)."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def _line_done(text: str) -> bool:
    """A row is done once a newline follows some non-whitespace text."""
    stripped = text.lstrip()
    return bool(stripped) and "\n" in stripped


class _LineStop:
    """Stopping criterion: per row, True once the new text holds a finished line."""

    def __init__(self, tokenizer: Any, prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :]  # (B, generated so far)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([_line_done(t) for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    description: str = "Generating",
) -> list[str]:
    """Greedy continuations of tokenized ``prompts``: the first non-empty line of each.

    Prompts are sorted by length and run ``batch_size`` at a time with LEFT padding
    (so every row's next token sits at the last position). Generation stops after
    ``max_new_tokens`` or once every row has produced EOS or finished a line. Only the
    new tokens are decoded; rows that finished early are cut at their first line, so
    the result does not depend on the batch.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}.")
    pad_id = pad_id_of(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=pad_id, eos_token_id=eos,
    )
    out = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for batch in track(_batches(order, batch_size), description):
        ids, mask = pad([prompts[i] for i in batch], pad_id, side="left")  # (B, L) each
        if prepends_virtual_tokens(model):  # PEFT's own generate re-prepends them at every cached step
            embeds, mask = _with_virtual_tokens(model, ids, mask)  # (B, P + L, H), (B, P + L)
            new = model.get_base_model().generate(
                inputs_embeds=embeds, attention_mask=mask, generation_config=gen_config,
                stopping_criteria=StoppingCriteriaList([_LineStop(tokenizer, 0)]),
            )  # (B, generated): only new tokens come back from embeddings
        else:
            new = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=gen_config,
                stopping_criteria=StoppingCriteriaList([_LineStop(tokenizer, ids.shape[1])]),
            )[:, ids.shape[1] :]  # (B, generated)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            out[i] = first_line(text)
    return out


def _with_virtual_tokens(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings with a prompt-tuned model's virtual tokens just before each row's real tokens.

    Rows are left-padded: ``[pad.., virtual, prompt]``, so positions counted from the mask
    give the virtual tokens ``0..P-1`` and the prompt ``P..``, as in training.
    """
    emb = model.get_base_model().get_input_embeddings()(ids)  # (B, L, H)
    virt = model.get_prompt(batch_size=ids.shape[0]).to(emb.dtype)  # (B, P, H)
    ones = torch.ones(virt.shape[:2], dtype=mask.dtype)  # (B, P)
    rows, masks = [], []
    for b in range(ids.shape[0]):
        start = int((mask[b] == 0).sum())  # left padding
        rows.append(torch.cat([emb[b, :start], virt[b], emb[b, start:]]))
        masks.append(torch.cat([mask[b, :start], ones[b], mask[b, start:]]))
    return torch.stack(rows), torch.stack(masks)
