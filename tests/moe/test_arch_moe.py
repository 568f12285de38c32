"""MoE architectures users own: bit-exact round trips through the weights engine, header checks, ranks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from expertkit.errors import CheckpointError
from expertkit.moe import NotAnMoeError, moe_structure
from expertkit.moe.rank import effective_rank
from expertkit.weights import Checkpoint, ShardedWriter

MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "switch_transformers")
# (MoE layers, shared-expert tensors per MoE layer) of each tiny model
SHAPE = {"mixtral": (2, 0), "qwen2_moe": (2, 4), "qwen3_moe": (2, 0), "olmoe": (2, 0), "deepseek_v2": (1, 3),
         "deepseek_v3": (1, 3), "switch_transformers": (4, 0)}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_round_trip_through_the_weights_engine_is_bit_exact(arch, tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(arch)
    out = tmp_path / "copy"
    with Checkpoint(src) as ckpt:
        with ShardedWriter(out, template=src, max_shard_size="40KB") as writer:  # several shards
            for name, tensor in ckpt.iter_tensors():
                writer.add(name, tensor)
        with Checkpoint(out) as back:
            assert len(back.shards) > 1 and back.names() == ckpt.names()
            for name in ckpt.names():
                assert torch.equal(back.read(name), ckpt.read(name)), name
    cls = AutoModelForSeq2SeqLM if arch == "switch_transformers" else AutoModelForCausalLM
    a, b = cls.from_pretrained(src), cls.from_pretrained(out)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(ta, tb), na


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_structure_finds_experts_routers_and_shared_parts(arch, tiny_checkpoint):
    layers = moe_structure(tiny_checkpoint(arch))
    n_layers, shared = SHAPE[arch]
    assert len(layers) == n_layers
    assert all(m.experts == (0, 1, 2, 3) and m.shared_tensors == shared for m in layers)


def test_dense_checkpoint_is_refused_naming_its_architecture(tiny_checkpoint):
    with pytest.raises(NotAnMoeError, match=r"model_type 'llama' \(llama\) is a dense architecture"):
        moe_structure(tiny_checkpoint("llama"))


def test_config_expert_count_disagreeing_with_router_rows_is_refused(tiny_checkpoint, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint("olmoe"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_experts"] = 6
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"router model\.layers\.0\.mlp\.gate\.weight has 4 rows but the config declares 6"):
        moe_structure(bad)


def test_effective_rank_known_answers():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(40, 1, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 30, generator=gen, dtype=torch.float64)
    ent, energy = effective_rank(u @ v)  # rank one
    assert ent == pytest.approx(1.0, abs=1e-9) and energy == 1
    # 12 equal singular values: entropy rank 12; 90% of sum(s^2) needs 11 of them (10/12 < 0.9 <= 11/12)
    ent, energy = effective_rank(torch.eye(12))
    assert ent == pytest.approx(12.0) and energy == 11
    assert effective_rank(torch.zeros(3, 3)) == (0.0, 0)
