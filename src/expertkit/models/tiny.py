"""Tiny random models for tests: every supported architecture, built from a config.

No network: each model is built with ``from_config`` from the table below (hidden
size 64, 2 layers, vocabulary 128, fp32, eval mode). MoE models have 4 experts;
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2/V3 route top-2 (DeepSeek: layer 0 is
a dense MLP, layer 1 has a shared expert beside the routed ones), Switch Transformers
routes top-1 (its router has no top-k setting). The same ``seed`` always gives identical weights, and building a
model leaves the caller's torch RNG state untouched.

Token ids are shared by all tiny models and by :func:`tiny_tokenizer`: 0 ``<pad>``,
1 ``<s>``, 2 ``</s>``, 3 ``<unk>``, then printable ASCII (space to ``~``) as 4..98.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from expertkit.errors import ConfigError, suggest, unknown

VOCAB_SIZE = 128
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_IDS = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}

# Decoder-only Llama-style base: head_dim 16, grouped-query attention (4 q heads, 2 kv heads).
_DECODER = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    **_IDS,
}
# T5-style base: d_model 64 = 4 heads x d_kv 16; 2 encoder + 2 decoder blocks.
_SEQ2SEQ = {
    "vocab_size": VOCAB_SIZE,
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "decoder_start_token_id": PAD_ID,
    "pad_token_id": PAD_ID,
    "eos_token_id": EOS_ID,
}

# arch -> (auto class, config kwargs). model_type is the arch name.
_TINY: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (AutoModelForCausalLM, _DECODER),
    "mistral": (AutoModelForCausalLM, {**_DECODER, "sliding_window": 64}),
    "qwen2": (AutoModelForCausalLM, _DECODER),
    "gpt2": (
        AutoModelForCausalLM,
        {"vocab_size": VOCAB_SIZE, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, **_IDS},
    ),
    "t5": (AutoModelForSeq2SeqLM, _SEQ2SEQ),
    "mixtral": (
        AutoModelForCausalLM,
        {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.0},
    ),
    "qwen2_moe": (
        AutoModelForCausalLM,
        {
            **_DECODER,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 128,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    "qwen3_moe": (
        AutoModelForCausalLM,
        {
            **_DECODER,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
        },
    ),
    "olmoe": (AutoModelForCausalLM, {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2}),
    # DeepSeek: layer 0 dense (first_k_dense_replace), layer 1 = 1 shared + 4 routed experts;
    # latent attention with kv rank 16 (no q compression), rope 8 + nope 8 per head.
    **{
        arch: (
            AutoModelForCausalLM,
            {
                **_DECODER,
                "num_key_value_heads": 4,  # latent attention expands kv to every head
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 64,
                "n_shared_experts": 1,
                "first_k_dense_replace": 1,
                "n_group": 1,
                "topk_group": 1,
                "kv_lora_rank": 16,
                "q_lora_rank": None,
                "qk_rope_head_dim": 8,
                "qk_nope_head_dim": 8,
                "v_head_dim": 16,
            },
        )
        for arch in ("deepseek_v2", "deepseek_v3")
    },
    "switch_transformers": (
        AutoModelForSeq2SeqLM,
        {
            **_SEQ2SEQ,
            "num_experts": 4,
            # every block sparse: sparse step = num_layers // num_sparse_layers = 1
            "num_sparse_encoder_layers": 2,
            "num_sparse_decoder_layers": 2,
            "expert_capacity": 1024,  # large: tiny test batches never drop tokens
            "router_jitter_noise": 0.0,
        },
    ),
}
TINY_ARCHS: tuple[str, ...] = tuple(_TINY)
_ALIASES = {"switch": "switch_transformers", "qwen2-moe": "qwen2_moe", "qwen3-moe": "qwen3_moe",
            "deepseek": "deepseek_v3", "deepseek-v2": "deepseek_v2", "deepseek-v3": "deepseek_v3"}


def _arch_name(arch: str) -> str:
    name = _ALIASES.get(arch, arch)
    if name not in _TINY:
        raise unknown("tiny architecture", arch, TINY_ARCHS)
    return name


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """The tiny config of ``arch`` (one of :data:`TINY_ARCHS`), with optional overrides.

    An override key the config does not know is an error (a typo would otherwise be
    silently stored as an unused attribute).
    """
    name = _arch_name(arch)
    config = AutoConfig.for_model(name, **_TINY[name][1])
    if not overrides:
        return config
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key in overrides:
        if key not in known:
            raise ConfigError(f"tiny_config('{name}'): unknown config key '{key}'.{suggest(key, known)}")
    # rebuilt, not patched, so derived fields (e.g. Switch sparse steps) follow the overrides
    return AutoConfig.for_model(name, **{**_TINY[name][1], **overrides})


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random model of ``arch``: fp32, eval mode, weights fixed by ``seed``.

    The global torch RNG state is restored afterwards. ``overrides`` go to
    :func:`tiny_config`.
    """
    name = _arch_name(arch)
    config = tiny_config(name, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _TINY[name][0].from_config(config)
    return model.float().eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII matching the tiny models' ids.

    Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3 ``<unk>``, then ``" "``..``"~"``.
    No special tokens are added on encode.
    """
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    # BPE with no merges = one token per character
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny(
    arch: str, path: str | os.PathLike[str], seed: int = 0, *, tokenizer: bool = True, **overrides: Any
) -> Path:
    """Build :func:`tiny_model` and ``save_pretrained`` it (safetensors) to ``path``; return the path.

    With ``tokenizer=True`` the :func:`tiny_tokenizer` is saved alongside.
    """
    path = Path(path)
    model = tiny_model(arch, seed, **overrides)
    model.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path


def saved_tiny(arch: str, path: str | os.PathLike[str], seed: int = 0) -> str:
    """The folder of a tiny random ``arch`` saved at ``path`` by :func:`save_tiny`, saved now if it is not
    there yet (``--smoke`` runs resume into the same folder); returned as a string, as a model name."""
    path = Path(path)
    return str(path if (path / "config.json").is_file() else save_tiny(arch, path, seed))
