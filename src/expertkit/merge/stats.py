"""Per-model statistics from a calibration set, for the ``fisher`` and ``regmean`` merges.

* :func:`diagonal_fisher`: the empirical diagonal Fisher ``F = mean_x (d log p(y|x) / d theta)^2``,
  one example at a time (``log p(y|x)`` is the summed log-likelihood of the target tokens).
* :func:`gram_matrices`: for every ``nn.Linear``, ``G = X^T X`` over the non-padding input tokens
  of the calibration examples (``(in, in)``), keyed by the layer's weight name.
* :func:`calibration_stats`: either statistic for a model folder (or a LoRA adapter on a base) and
  a task's train split, saved as a safetensors folder that a merge config names in ``stats:``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.train.data import IGNORE, Row, collate


def _pad_id(tokenizer: Any) -> int:
    from expertkit.tasks.infer import pad_id_of

    return pad_id_of(tokenizer)


def diagonal_fisher(model: Any, rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of the target log-likelihood, per parameter (fp32)."""
    params = {n: p for n, p in model.named_parameters()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        for row in rows:
            ids, mask, labels = collate([row], pad_id)  # (1, L) each
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (1, L-1, V)
            target = labels[:, 1:]  # (1, L-1)
            logp = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE,
                                                      reduction="sum")
            model.zero_grad(set_to_none=True)
            logp.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n].add_(p.grad.float().square())
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(was[n])
    return {n: f.div_(max(len(rows), 1)) for n, f in fisher.items()}


def gram_matrices(model: Any, rows: Sequence[Row], pad_id: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``X^T X`` of the inputs of every ``nn.Linear`` over non-padding tokens, keyed by weight name."""
    grams: dict[str, torch.Tensor] = {}
    current_mask: list[torch.Tensor] = []
    hooks = []

    def hook(name: str):
        def fn(_module: Any, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = inputs[0].detach().float()  # (B, L, in)
            x = x[current_mask[0].bool()]  # (tokens, in)
            g = x.T @ x  # (in, in)
            grams[name] = grams[name] + g if name in grams else g
        return fn

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(hook(f"{name}.weight")))
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                ids, mask, _ = collate(rows[start:start + batch_size], pad_id)  # (B, L)
                current_mask[:] = [mask]
                model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return grams


def calibration_stats(model: str | os.PathLike[str], task: str, out_dir: str | os.PathLike[str], *,
                      kind: str = "fisher", n: int = 32, seed: int = 0, adapter: str | None = None,
                      max_prompt_tokens: int = 256) -> Path:
    """Compute ``kind`` (``fisher`` or ``gram``) for ``model`` (plus ``adapter``) on ``n`` train
    examples of ``task`` and save them as a safetensors folder at ``out_dir``; returns it."""
    from expertkit.models import load_model
    from expertkit.tasks.base import get_task
    from expertkit.train.data import encode_examples
    from expertkit.weights.writer import save_state_dict

    if kind not in ("fisher", "gram"):
        raise ConfigError(f"unknown statistic '{kind}'; use 'fisher' or 'gram'.")
    loaded = load_model(str(model))
    net = loaded.model
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter).merge_and_unload()
    t = get_task(task)
    rows = encode_examples(loaded.tokenizer, t, t.examples("train", n, seed), max_prompt_tokens)
    pad = _pad_id(loaded.tokenizer)
    stats = diagonal_fisher(net, rows, pad) if kind == "fisher" else gram_matrices(net, rows, pad)
    state_names = set(net.state_dict())
    return save_state_dict({k: v.contiguous() for k, v in stats.items() if k in state_names}, out_dir)
