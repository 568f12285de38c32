"""Fine-tuning schemes: what is trained and what is written.

* ``lora``: PEFT LoRA on ``target_modules`` (the default; a PEFT adapter folder).
* ``prefix``: PEFT prefix tuning, ``num_virtual_tokens`` trained key/value prefixes per layer
  (a PEFT adapter folder).
* ``prompt``: PEFT prompt tuning, ``num_virtual_tokens`` trained input embeddings (a PEFT
  adapter folder).
* ``full``: every parameter of the model (a full model folder, ``model.safetensors`` +
  ``config.json``). The caller's model is trained in place and given back afterwards: its
  weights are read again from its folder, or restored from a copy taken before training
  when it has none (that copy costs one model in memory).

Every scheme works with every optimizer (first-order or zeroth-order).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import ConfigError

SCHEMES = ("lora", "full", "prefix", "prompt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_FILES = ("config.json", "model.safetensors")


def output_files(scheme: str) -> tuple[str, ...]:
    """The files a finished output folder of ``scheme`` must hold."""
    return FULL_FILES if scheme == "full" else ADAPTER_FILES


def _peft_config(config: Any) -> Any:
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if config.scheme == "lora":
        return LoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
            target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM",
        )
    if config.scheme == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type="CAUSAL_LM")
    return PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type="CAUSAL_LM")


def wrap(model: Any, config: Any, source: Path | None) -> tuple[Any, Callable[[], None]]:
    """Prepare ``model`` for ``config.scheme``: ``(model to train, give_back)``.

    ``give_back()`` returns the caller's model to its state before training (PEFT layers
    removed, or full weights restored; ``requires_grad`` flags as they were) in eval mode.
    """
    if config.scheme == "full":
        return _wrap_full(model, source)
    from peft import get_peft_model

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers helper
            peft_model = get_peft_model(model, _peft_config(config))
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"target_modules {list(config.target_modules)} match no layer of the model ({exc}). "
            f"Linear layer names in this model: {', '.join(names)}."
        ) from exc

    def give_back() -> None:
        if config.scheme == "lora":
            peft_model.unload()  # the caller's base model gets its plain layers back
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))  # PEFT froze the base weights
        model.eval()

    return peft_model, give_back


def _wrap_full(model: Any, source: Path | None) -> tuple[Any, Callable[[], None]]:
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    has_files = source is not None and any(Path(source).glob("*.safetensors"))
    snapshot = None if has_files else {k: v.detach().clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.requires_grad_(True)

    def give_back() -> None:
        with torch.no_grad():
            if snapshot is not None:
                model.load_state_dict(snapshot)
            else:
                _reload(model, Path(source))  # type: ignore[arg-type]
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.eval()

    return model, give_back


def _reload(model: Any, source: Path) -> None:
    """Copy the weights stored in ``source`` back into ``model``, one tensor at a time."""
    from expertkit.weights import Checkpoint

    state = model.state_dict()
    with Checkpoint(source) as ckpt:
        for name in ckpt.names():
            if name in state:
                state[name].copy_(ckpt.read(name))


def save(model: Any, folder: Path, scheme: str) -> None:
    """Write the trained part of ``model`` into ``folder`` (adapter, or full model for ``full``)."""
    if scheme == "full":
        model.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder, save_embedding_layers=False)  # no hub look-up for the vocab
