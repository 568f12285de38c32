"""Stored quantized models: pack / unpack exact, compressed-tensors folders read back bit for bit, GGUF blocks exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from expertkit.errors import CheckpointError, ConfigError
from expertkit.models import load_model
from expertkit.models.tiny import save_tiny
from expertkit.quant.config import QuantizeConfig
from expertkit.quant.run import quantize, quantize_model

CALIB = {"text_blocks": 0, "tasks": ["add_sub"], "prompts_per_task": 4, "batch_size": 4}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip_is_exact(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    gen = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (12, 96), generator=gen, dtype=torch.int8)
    packed = pack_to_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (12, -(-96 * bits // 32))  # dense: bits per code
    assert torch.equal(unpack_from_int32(packed, bits, codes.shape), codes)
    zeros = torch.randint(lo, hi + 1, (12, 3), generator=gen, dtype=torch.int8)
    assert torch.equal(unpack_from_int32(pack_to_int32(zeros, bits, packed_dim=0), bits, zeros.shape, packed_dim=0), zeros)


def _config(folder, **over):
    return QuantizeConfig.model_validate({"model": str(folder), "group_size": 32, "calibration": CALIB, **over})


@pytest.mark.parametrize(("arch", "symmetric"), [("mixtral", True), ("mixtral", False), ("llama", True),
                                                 ("qwen2_moe", False)])
def test_a_compressed_folder_loads_back_bit_for_bit(tmp_path, arch, symmetric):
    folder = save_tiny(arch, tmp_path / "m", seed=3)
    policy = {"kind": "rules", "default": 3, "rules": [{"group": "attention", "bits": 4},
                                                       {"kind": "down", "layers": [1], "bits": 2},
                                                       {"group": "shared_expert", "bits": 16}]}
    result, paths = quantize(_config(folder, symmetric=symmetric, policy=policy,
                                     formats=["compressed", "dequantized"]), tmp_path / "q")
    assert paths == {"compressed": tmp_path / "q", "dequantized": tmp_path / "q" / "dequantized"}
    want = result.loaded.model.state_dict()
    for where in paths.values():
        back = load_model(str(where)).model.state_dict()
        assert set(back) == set(want)
        assert all(torch.equal(back[k], want[k]) for k in want), [k for k in want if not torch.equal(back[k], want[k])]
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert {g["weights"]["num_bits"] for g in qc["config_groups"].values()} == {2, 3, 4}
    assert all(g["weights"]["symmetric"] is symmetric for g in qc["config_groups"].values())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
        attn = "model.layers.0.self_attn.q_proj"
        assert fh.get_tensor(f"{attn}.weight_packed").dtype == torch.int32
        assert f"{attn}.weight" not in names and (f"{attn}.weight_zero_point" in names) is (not symmetric)
        rows, cols = fh.get_tensor(f"{attn}.weight_shape").tolist()
        assert fh.get_tensor(f"{attn}.weight_packed").shape == (rows, cols * 4 // 32)  # 4 bits a code
        assert fh.get_tensor(f"{attn}.weight_scale").shape == (rows, cols // 32)
    if arch == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert.down_proj" in qc["ignore"]  # kept in 16-bit


def test_the_stored_bits_are_the_allocated_bits(tmp_path):
    folder = save_tiny("mixtral", tmp_path / "m", seed=1)
    result, _ = quantize(_config(folder, policy={"kind": "outlier", "target_bits": 3.0, "choices": [2, 3, 4]}),
                         tmp_path / "q")
    from safetensors import safe_open

    stored = 0
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as fh:
        for name in fh.keys():  # noqa: SIM118 - safe_open has no iterator
            if name.endswith(".weight_packed"):
                module = name.removesuffix(".weight_packed")
                rows, cols = fh.get_tensor(f"{module}.weight_shape").tolist()
                bits = fh.get_tensor(name).shape[1] * 32 // cols
                stored += rows * cols * bits + fh.get_tensor(f"{module}.weight_scale").numel() * 16
    assert stored == result.allocation.total_bits and result.allocation.achieved == 3.0


def test_gguf_blocks_carry_the_codes_and_scales_exactly(tmp_path):
    import gguf
    from gguf.quants import dequantize

    from expertkit.quant.gguf import write_gguf

    folder = save_tiny("mixtral", tmp_path / "m", seed=2)
    cfg = _config(folder, policy={"kind": "rules", "default": 4, "rules": [{"group": "attention", "bits": 8}]})
    result = quantize_model(cfg)
    path = write_gguf(result, tmp_path / "m.gguf", tokenizer=False)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert tensors["blk.0.attn_v.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    down = tensors["blk.1.ffn_down_exps.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.Q4_0
    recs = [result.records[f"model.layers.1.mlp.experts.down_proj[{e}].w2"] for e in range(4)]
    w = result.loaded.model.state_dict()["model.layers.1.mlp.experts.down_proj"]  # (E, H, I)
    from expertkit.quant.apply import codes_of

    def exact(w, r):  # d * q in float32, as llama.cpp computes it (the model holds the float16 product)
        return (codes_of(w, r).codes.float() * r.scale.repeat_interleave(32, 1)).numpy()

    want = np.stack([exact(w[e], r) for e, r in enumerate(recs)])
    assert np.array_equal(dequantize(down.data, down.tensor_type), want)
    v = result.loaded.model.state_dict()["model.layers.0.self_attn.v_proj.weight"]
    got = dequantize(tensors["blk.0.attn_v.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(got, exact(v, result.records["model.layers.0.self_attn.v_proj.weight"]))
    assert 0 < np.abs(got - v.numpy()).max() < 1e-4  # float16 vs float32 product: the last float16 bit


def test_bad_storage_requests_get_clear_errors(tmp_path):
    from expertkit.quant.gguf import write_gguf

    folder = save_tiny("mixtral", tmp_path / "m", seed=2)
    result = quantize_model(_config(folder, method="rtn", group_size=-1))
    with pytest.raises(ConfigError, match="GGUF export needs group_size 32 and symmetric: true"):
        write_gguf(result, tmp_path / "x.gguf", tokenizer=False)
    gpt2 = quantize_model(_config(save_tiny("gpt2", tmp_path / "g", seed=0), method="rtn", group_size=-1))
    with pytest.raises(ConfigError, match="GPT-2 Conv1D.*use formats: \\[dequantized\\]"):
        quantize(gpt2.config, tmp_path / "gq")  # not written: the output folder does not appear
    assert not (tmp_path / "gq").exists()
    bad = tmp_path / "bad"
    quantize(_config(folder, method="rtn"), bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = "four"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="invalid quantization_config"):
        load_model(str(bad))
    with pytest.raises(CheckpointError, match="exists; pass --overwrite"):
        quantize(_config(folder, method="rtn"), bad)


def test_transformers_loads_a_uniform_compressed_moe_itself(tmp_path):
    """transformers 5.24 reads our folder on CPU when every expert shares one scheme (docs/quant.md says
    what it does with mixed per-expert bits, and that load_model reads both)."""
    import warnings

    from transformers import AutoModelForCausalLM

    folder = save_tiny("mixtral", tmp_path / "m", seed=1)
    result, paths = quantize(_config(folder, method="rtn", policy={"kind": "uniform", "bits": 4}), tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoModelForCausalLM.from_pretrained(str(paths["compressed"]))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (theirs(ids).logits - result.loaded.model(ids).logits).abs().max()
    assert diff < 1e-3  # they decompress in float16 arithmetic of their own: rounding only


def test_docs_python_example_runs(capsys):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "quant.md").read_text()
    block = re.findall(r"```python\n(.*?)```", doc, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, "docs/quant.md", "exec"), namespace)  # noqa: S102 - our own docs
    result = namespace["result"]
    assert result.allocation.achieved == 3.0 and result.allocation.code_bits == 2.5
    by = result.report()["bits_by_structure"]["group"]
    assert by["attention"]["bits"] > by["expert"]["bits"]
    back = namespace["back"].model.state_dict()
    assert all(torch.equal(back[k], v) for k, v in result.loaded.model.state_dict().items())


def test_an_mc_smoe_compressed_moe_quantizes_and_reads_back(tmp_path):
    """Fewer experts per layer (expertkit.moe.compress): the quantized folder decompresses through load_model."""
    from expertkit.moe.compress import CompressConfig, compress_moe

    moe = save_tiny("mixtral", tmp_path / "moe")
    small = compress_moe(CompressConfig(model=str(moe), method="msmoe", experts_per_layer=2, allocation="uniform",
                                        calibration={"tasks": ["add_sub", "gcd"], "n": 4}), tmp_path / "small")
    result, paths = quantize(_config(small.path, method="rtn", policy={"kind": "uniform", "bits": 4}), tmp_path / "q")
    assert len([r for r in result.records.values() if r.target.group == "expert"]) == 2 * 2 * 3  # layers x experts x 3
    back, want = load_model(str(paths["compressed"])).model.state_dict(), result.loaded.model.state_dict()
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)
