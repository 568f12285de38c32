"""Helpers of the privacy tests: a tiny Llama wrapped for LoRA / prefix / full training, and a batch."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from expertkit.models.tiny import tiny_model


def wrapped(scheme: str, seed: int = 0, virtual_tokens: int = 3) -> Any:
    """A tiny Llama (hidden 64, 2 layers) prepared for ``scheme`` as training prepares it, in train mode."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    model = tiny_model("llama", seed=seed)
    if scheme == "lora":
        cfg: Any = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    elif scheme == "prefix":
        cfg = PrefixTuningConfig(num_virtual_tokens=virtual_tokens, task_type="CAUSAL_LM")
    else:
        cfg = None
    if cfg is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            model = get_peft_model(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if scheme == "lora":  # LoRA B starts at zero, which makes A's gradient zero: move off it
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.train()


def make_batch(n: int = 4, length: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, mask, labels)``, each ``(n, length)``: random tokens, the last row right-padded,
    labels on the second half only (as training labels the target)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (n, length), generator=gen)  # (n, L)
    mask = torch.ones_like(ids)
    mask[-1, length - 3:] = 0
    ids[-1, length - 3:] = 0
    labels = ids.clone()
    labels[:, : length // 2] = -100
    labels[mask == 0] = -100
    return ids, mask, labels
