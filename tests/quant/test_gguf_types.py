"""GGUF export known answers: every block type decoded by the gguf package's own dequantizer, and
llama.cpp's q/k row permutation checked against transformers' GGUF loader (its inverse)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf  # a pinned runtime dependency: a failed import must fail, not skip

from expertkit.quant.gguf import _permute, encode_blocks, ggml_type  # noqa: E402

T = gguf.GGMLQuantizationType


@pytest.mark.parametrize(("bits", "qtype"), [(3, T.Q4_0), (4, T.Q4_0), (5, T.Q5_0), (6, T.Q8_0), (8, T.Q8_0)])
def test_blocks_decode_with_gguf_to_scale_times_code(bits, qtype):
    from gguf.quants import dequantize

    assert ggml_type(bits) == qtype
    g = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (6, 96), generator=g)  # (rows, cols): every code of the range occurs
    codes[0, :32] = torch.arange(32) % (hi - lo + 1) + lo  # the extremes, in one block
    scale = (torch.rand(6, 3, generator=g) * 0.1 + 1e-3).half()  # (rows, cols / 32)
    blocks = encode_blocks(codes, scale, qtype)  # (rows, 3 * block bytes)
    assert blocks.shape == (6, 3 * gguf.GGML_QUANT_SIZES[qtype][1])
    got = dequantize(blocks, qtype)  # (6, 96)
    want = (codes.float() * scale.float().repeat_interleave(32, 1)).numpy()  # d * q in float32, as llama.cpp
    assert np.array_equal(got, want)


def test_q5_0_block_layout_by_hand():
    """One Q5_0 block: float16 d, 4 bytes of the codes' fifth bits (little-endian), then low nibbles of
    codes 0..15 in the low halves and of 16..31 in the high halves of 16 bytes; value d * (u - 16)."""
    codes = torch.arange(32).reshape(1, 32) - 16  # u = code + 16 = 0..31
    blocks = encode_blocks(codes, torch.tensor([[0.5]]).half(), T.Q5_0)[0]  # (22,)
    assert blocks[:2].view(np.float16)[0] == 0.5
    assert int.from_bytes(blocks[2:6].tobytes(), "little") == 0xFFFF0000  # u >= 16 exactly for codes 16..31
    assert list(blocks[6:]) == [(u & 15) | ((u + 16) & 15) << 4 for u in range(16)]


def _loader_inverse(array: np.ndarray, gguf_name: str, heads: int, kv_heads: int) -> np.ndarray:
    """What transformers' GGUF loader does to a llama q/k tensor it reads (the inverse of llama.cpp's permutation)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    config = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    return LlamaTensorProcessor(config).process(array, gguf_name).weights


def test_qk_permutation_is_llama_cpps_and_transformers_reverses_it():
    # head_dim 4, 2 heads: HF pairs rotary halves (row i with i + 2), llama.cpp adjacent rows
    rows = torch.arange(8).reshape(8, 1).float()
    assert _permute(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))  # (q rows: 4 heads x 16, H)
    for heads, name in ((4, "blk.0.attn_q.weight"), (2, "blk.0.attn_k.weight")):  # 4 q heads, 2 kv heads
        x = w[: heads * 16]
        assert not torch.equal(_permute(x, heads), x)
        assert np.array_equal(_loader_inverse(_permute(x, heads).numpy(), name, 4, 2), x.numpy())
    scale = torch.randn(64, 2)  # the per-group scales follow their rows
    assert np.array_equal(_loader_inverse(_permute(scale, 4).numpy(), "blk.0.attn_q.weight", 4, 2), scale.numpy())


def test_exported_q_and_k_projections_decode_to_the_hf_rows_after_the_loaders_inverse(tmp_path):
    """End to end on the tiny llama (4 q heads, 2 kv heads): attention at 5 bits is written as Q5_0 and
    permuted; gguf decodes it and transformers' inverse permutation gives back the HF rows' d * q."""
    from expertkit.models.tiny import save_tiny
    from expertkit.quant.apply import codes_of
    from expertkit.quant.config import QuantizeConfig
    from expertkit.quant.gguf import write_gguf
    from expertkit.quant.run import quantize_model

    folder = save_tiny("llama", tmp_path / "m", seed=4)
    cfg = QuantizeConfig.model_validate({"model": str(folder), "group_size": 32, "method": "rtn",
                                         "calibration": {"text_blocks": 0, "tasks": ["add_sub"], "prompts_per_task": 2,
                                                                     "batch_size": 2},
                                         "policy": {"kind": "rules", "default": 8,
                                                    "rules": [{"group": "attention", "bits": 5}]}})
    result = quantize_model(cfg)
    path = write_gguf(result, tmp_path / "m.gguf", tokenizer=False)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    state = result.loaded.model.state_dict()
    for proj, short, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2), ("v_proj", "attn_v", None)):
        name = f"model.layers.1.self_attn.{proj}.weight"
        t = tensors[f"blk.1.{short}.weight"]
        assert t.tensor_type == T.Q5_0
        rec = result.records[name]
        want = (codes_of(state[name], rec).codes.float() * rec.scale.float().repeat_interleave(32, 1)).numpy()
        got = gguf.quants.dequantize(t.data, t.tensor_type)  # llama.cpp's row order
        if heads is not None:
            assert not np.array_equal(got, want)  # permuted on disk
            got = _loader_inverse(got, t.name, 4, 2)
        assert np.array_equal(got, want)
