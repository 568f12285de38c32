"""GGUF export (llama.cpp) with a GGML type per tensor, written with the ``gguf`` package.

The codes and scales are carried over exactly, which needs llama.cpp's block layout: 32 weights per
block with one float16 scale, symmetric. So the export requires ``group_size: 32`` and
``symmetric: true``, and a matrix of ``b`` bits is stored as the smallest block type its codes fit:

* 2, 3 or 4 bits -> ``Q4_0`` (value = d * (q - 8), q in 0..15): exact, but 4.5 bits per weight on
  disk; llama.cpp has no 2- or 3-bit type with one float16 scale per 32 weights (its K-quants
  quantize the scales themselves);
* 5 bits -> ``Q5_0``; 6 to 8 bits -> ``Q8_0``; kept (16-bit) -> ``F16``;
* a stacked expert tensor (``ffn_gate_exps`` etc.: all experts of a layer in one tensor, one type)
  takes the type of its widest expert.

llama.cpp multiplies ``d * q`` in float32 where compressed-tensors multiplies in float16, so decoded
weights can differ in the last float16 bit; codes and scales are identical. Supported: Llama
(SmolLM2) and Mixtral (llama.cpp's ``llama`` architecture with experts); the tokenizer is written
from ``tokenizer.json`` by gguf's ``BpeVocab`` / ``SpecialVocab`` when it is a GPT-2-style BPE.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expertkit.errors import ConfigError

BLOCK = 32
SUPPORTED = ("llama", "mixtral")


def ggml_type(bits: int) -> Any:
    """The GGML type a ``bits``-bit matrix is stored as."""
    from gguf import GGMLQuantizationType as T

    if bits == 16:
        return T.F16
    return T.Q4_0 if bits <= 4 else (T.Q5_0 if bits == 5 else T.Q8_0)


def encode_blocks(codes: torch.Tensor, scale: torch.Tensor, qtype: Any) -> np.ndarray:
    """``(rows, cols / 32 * block bytes)`` uint8 blocks of signed ``codes`` ``(rows, cols)`` with one scale
    per 32 columns ``scale`` ``(rows, cols / 32)``."""
    from gguf import GGMLQuantizationType as T

    rows, cols = codes.shape
    q = codes.to(torch.int16).numpy().reshape(rows, cols // BLOCK, BLOCK)  # (rows, nb, 32)
    d = scale.to(torch.float16).numpy().reshape(rows, cols // BLOCK, 1).view(np.uint8)  # (rows, nb, 2)
    if qtype == T.Q8_0:
        body = q.astype(np.int8).view(np.uint8)
    elif qtype == T.Q4_0:
        u = (q + 8).astype(np.uint8)
        body = u[..., :16] | (u[..., 16:] << np.uint8(4))
    elif qtype == T.Q5_0:
        u = (q + 16).astype(np.uint8)
        qh = np.packbits((u >> np.uint8(4)).reshape(rows, -1, 1, BLOCK), axis=-1, bitorder="little").reshape(rows, -1, 4)
        body = np.concatenate([qh, (u[..., :16] & np.uint8(15)) | (u[..., 16:] << np.uint8(4))], axis=-1)
    else:
        raise ConfigError(f"no block encoder for {qtype.name}.")
    return np.concatenate([d, body], axis=-1).reshape(rows, -1)


def _permute(x: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of q/k projections (its rotary pairs adjacent rows; HF's pairs halves)."""
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def write_gguf(result: Any, path: Path, *, tokenizer: bool = True) -> Path:
    """Write ``result``'s quantized model as a GGUF file at ``path``."""
    import gguf

    model, config = result.loaded.model, result.loaded.model.config
    if config.model_type not in SUPPORTED:
        raise ConfigError(f"GGUF export supports {', '.join(SUPPORTED)} models, not {config.model_type!r}.")
    for rec in result.records.values():
        if rec.scheme.quantized and (rec.scheme.group_size != BLOCK or not rec.scheme.symmetric):
            raise ConfigError(f"GGUF export needs group_size {BLOCK} and symmetric: true (llama.cpp's blocks are 32 "
                              f"weights with one float16 scale); this model has group_size {rec.scheme.group_size}, "
                              f"symmetric {rec.scheme.symmetric}.")
    layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    _metadata(writer, config)
    with tempfile.TemporaryDirectory(prefix="expertkit-gguf-") as tmp:
        folder = Path(tmp)
        model.save_pretrained(folder)
        if tokenizer and result.loaded.tokenizer is not None:
            result.loaded.tokenizer.save_pretrained(folder)
            _tokenizer(writer, folder, config.vocab_size)
        for gname, array, qtype in _tensors(result, folder, names, config):
            writer.add_tensor(gname, array, raw_dtype=qtype)  # quantized: array is (..., rows, block bytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _metadata(writer: Any, c: Any) -> None:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    writer.add_name(getattr(c, "_name_or_path", "") or "expertkit-quantized")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if getattr(c, "num_local_experts", None):
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)


def _tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    from gguf.vocab import BpeVocab, SpecialVocab

    try:
        vocab = BpeVocab(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"GGUF export writes GPT-2-style BPE tokenizers only ({exc}); pass tokenizer=False.") from None
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        tokens.append(text if isinstance(text, bytes) else str(text).encode())
        types.append(kind)
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), vocab_size)]
    types += [types[-1].__class__.UNUSED] * (vocab_size - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _tensors(result: Any, folder: Path, names: Any, config: Any):
    """``(gguf name, array, GGML type | None)`` for every tensor, experts stacked per layer."""
    from gguf import GGMLQuantizationType as T

    from expertkit.quant.apply import codes_of
    from expertkit.quant.storage import _disk_key, _record_index
    from expertkit.weights.arch import describe
    from expertkit.weights.reader import Checkpoint

    index = _record_index(result)
    stacks: dict[tuple[int, str], dict[int, tuple[torch.Tensor, Any]]] = {}
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    with Checkpoint(folder) as ckpt:
        roles = describe(ckpt.names(), ckpt.config).roles
        for name in ckpt.names():
            role, t = roles[name], ckpt.read(name).float()
            rec = index.get(_disk_key(role, name))
            if role.expert is not None:
                stacks.setdefault((role.layer, role.module), {})[role.expert] = (t, rec)
                continue
            if rec is None:
                yield names.get_name(name, try_suffixes=(".weight", ".bias")), t.numpy(), None
                continue
            yield (names.get_name(name, try_suffixes=(".weight",)), *_encode(t, rec, codes_of, heads.get(role.module)))
        for (layer, module), experts in sorted(stacks.items()):
            parts = [experts[e] for e in sorted(experts)]
            bits = max(r.scheme.bits if r is not None else 16 for _, r in parts)
            qtype = ggml_type(bits)
            if qtype == T.F16:
                array, qtype = torch.stack([t for t, _ in parts]).half().numpy(), None
            else:
                array = np.stack([encode_blocks(codes_of(t, r).codes, r.scale, qtype) for t, r in parts])
            merged = f"model.layers.{layer}.block_sparse_moe.experts.{module}.weight"
            yield names.get_name(merged, try_suffixes=(".weight",)), array, qtype


def _encode(t: torch.Tensor, rec: Any, codes_of: Any, heads: int | None):
    if not rec.scheme.quantized:
        return t.half().numpy(), None
    qtype = ggml_type(rec.scheme.bits)
    q = codes_of(t, rec)  # in the HF row order, where the grid was recorded
    codes, scale = (q.codes, rec.scale) if heads is None else (_permute(q.codes, heads), _permute(rec.scale, heads))
    return encode_blocks(codes, scale, qtype), qtype
