"""Fine-tuning schemes: what is trained and what is written.

* ``lora``: PEFT LoRA on ``target_modules`` (the default; a PEFT adapter folder).
* ``prefix``: PEFT prefix tuning, ``num_virtual_tokens`` trained key/value prefixes per layer
  (a PEFT adapter folder). ``prefix_init: real`` (the default) starts every layer's prefix at the
  keys and values the model itself computes for ``num_virtual_tokens`` vocabulary tokens (sampled
  with the run's seed), so the untrained prefix reads as a few real tokens in front of the input
  (Li & Liang 2021 found real-word initialisation much better than random in low-data settings);
  ``random`` keeps PEFT's N(0, 1) embedding, which in every layer attends to large random keys and
  values and starts far from the base model (measured on SmolLM2-135M, bbc_topic: a prefix trained
  40 steps from random init scored 0.427 against the base model's 0.613).
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


@torch.no_grad()
def real_prefix(model: Any, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (tokens,), embedding (tokens, layers * 2 * kv_dim))``: the model's own keys and values for
    ``tokens`` vocabulary ids drawn with ``seed``, in PEFT's prefix layout (each row viewed as
    ``(layers * 2, kv heads, head_dim)``, key then value per layer). Keys are the cache's, rotated at
    positions ``0..tokens-1``, where PEFT's prefix sits in front of the input's positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(model.config.vocab_size), (tokens,), generator=gen)  # (T,)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids[None], use_cache=True)
    finally:
        model.train(was_training)
    cache = getattr(out, "cache", None) or out.past_key_values
    rows = []  # per layer: key (T, kv_dim), value (T, kv_dim)
    for layer in cache.layers:
        for t in (layer.keys, layer.values):  # (1, kv heads, T, head_dim)
            rows.append(t[0].permute(1, 0, 2).reshape(tokens, -1))  # (T, kv heads * head_dim)
    return ids, torch.cat(rows, dim=1)  # (T, layers * 2 * kv_dim)


def _init_prefix(peft_model: Any, config: Any) -> None:
    """Set the prefix embedding from :func:`real_prefix` of the base model (``prefix_init: real``)."""
    from expertkit.privacy.prefix import prefix_parameter

    _, param, _ = prefix_parameter(peft_model)
    _, emb = real_prefix(peft_model.get_base_model(), config.num_virtual_tokens, config.seed)  # the plain model
    if emb.shape != param.shape:
        raise ConfigError(f"the model's keys and values give a prefix of shape {tuple(emb.shape)}, PEFT expects "
                          f"{tuple(param.shape)}; use prefix_init: random for this architecture.")
    with torch.no_grad():
        param.copy_(emb.to(param.dtype))


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
    if config.scheme == "prefix" and config.prefix_init == "real":
        _init_prefix(peft_model, config)

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
