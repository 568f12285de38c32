"""Architecture descriptors: every tiny model's tensors land in the right group, on disk and in memory."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from expertkit.errors import ConfigError, UnknownNameError
from expertkit.models.tiny import TINY_ARCHS, tiny_config, tiny_model
from expertkit.weights.arch import (
    GROUPS,
    InferredArchitectureWarning,
    TensorRole,
    classify,
    describe,
    descriptor_for,
    list_architectures,
    load_descriptor,
)
from expertkit.weights.reader import Checkpoint

# Group sizes of each tiny model as written by save_pretrained, counted by hand:
# 2 layers (2 encoder + 2 decoder blocks for t5/switch), 4 experts. Tied embeddings
# (gpt2, t5, switch) are written once, without lm_head.weight.
DISK_COUNTS = {
    "llama": {"embedding": 1, "lm_head": 1, "final_norm": 1, "attention": 4 * 2, "mlp": 3 * 2, "norm": 2 * 2},
    "mistral": {"embedding": 1, "lm_head": 1, "final_norm": 1, "attention": 4 * 2, "mlp": 3 * 2, "norm": 2 * 2},
    # q/k/v weight+bias, o weight
    "qwen2": {"embedding": 1, "lm_head": 1, "final_norm": 1, "attention": 7 * 2, "mlp": 3 * 2, "norm": 2 * 2},
    # c_attn/c_proj weight+bias; c_fc/c_proj weight+bias; ln_1/ln_2 weight+bias; ln_f weight+bias
    "gpt2": {"embedding": 1, "position": 1, "final_norm": 2, "attention": 4 * 2, "mlp": 4 * 2, "norm": 4 * 2},
    # encoder block: q,k,v,o + 2 norms; decoder block: 2 x (q,k,v,o) + 3 norms; bias in block 0 only
    "t5": {"embedding": 1, "final_norm": 2, "position": 2, "attention": 4 * 2 + 8 * 2, "mlp": 2 * 4, "norm": 2 * 2 + 3 * 2},
    "mixtral": {"embedding": 1, "lm_head": 1, "final_norm": 1, "attention": 4 * 2, "norm": 2 * 2, "expert": 3 * 4 * 2, "router": 2},
    "qwen2_moe": {
        "embedding": 1, "lm_head": 1, "final_norm": 1, "attention": 7 * 2, "norm": 2 * 2,
        "expert": 3 * 4 * 2, "shared_expert": 4 * 2, "router": 2,
    },
    # q/k/v/o; input/post norms + per-head q_norm/k_norm
    "qwen3_moe": {"embedding": 1, "lm_head": 1, "final_norm": 1, "attention": 4 * 2, "norm": 4 * 2,
                  "expert": 3 * 4 * 2, "router": 2},
    "olmoe": {"embedding": 1, "lm_head": 1, "final_norm": 1, "attention": 4 * 2, "norm": 4 * 2,
              "expert": 3 * 4 * 2, "router": 2},
    # latent attention q / kv_a / kv_b / o; input/post/kv_a norms; layer 0 dense, layer 1 experts + 1 shared
    "deepseek_v2": {"embedding": 1, "lm_head": 1, "final_norm": 1, "attention": 4 * 2, "norm": 3 * 2,
                    "mlp": 3, "expert": 3 * 4, "shared_expert": 3, "router": 1},
    # V3's router adds e_score_correction_bias
    "deepseek_v3": {"embedding": 1, "lm_head": 1, "final_norm": 1, "attention": 4 * 2, "norm": 3 * 2,
                    "mlp": 3, "expert": 3 * 4, "shared_expert": 3, "router": 2},
    "switch_transformers": {
        "embedding": 1, "final_norm": 2, "position": 2, "attention": 4 * 2 + 8 * 2, "norm": 2 * 2 + 3 * 2,
        "expert": 2 * 4 * 4, "router": 4,
    },
}  # fmt: skip
# Expert modules per expert, on disk.
SWIGLU = {"gate_proj", "up_proj", "down_proj"}
EXPERT_MODULES = {"mixtral": {"w1", "w2", "w3"}, "qwen2_moe": SWIGLU, "qwen3_moe": SWIGLU, "olmoe": SWIGLU,
                  "deepseek_v2": SWIGLU, "deepseek_v3": SWIGLU, "switch_transformers": {"wi", "wo"}}  # fmt: skip
MOE = tuple(EXPERT_MODULES)
FUSED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")  # fused in memory
# MoE layers of each tiny model (DeepSeek's layer 0 is dense: first_k_dense_replace = 1)
MOE_LAYERS = {arch: (1,) if arch.startswith("deepseek") else (0, 1) for arch in MOE}


def _counts(summary):
    return {g: len(v) for g, v in summary.groups.items() if v}


def test_list_architectures_is_every_shipped_descriptor():
    assert list_architectures() == sorted(TINY_ARCHS)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_describe_on_disk_groups_every_tensor(arch, tiny_checkpoint):
    with Checkpoint(tiny_checkpoint(arch)) as ckpt:
        names, config = ckpt.names(), ckpt.config
    summary = describe(names, config)
    assert summary.architecture == arch and summary.model_type == arch and not summary.inferred
    assert summary.other == ()
    assert _counts(summary) == DISK_COUNTS[arch]
    assert summary.num_layers == 2
    stacks = {"encoder": 2, "decoder": 2} if arch in ("t5", "switch_transformers") else {None: 2}
    assert summary.layers_per_stack == stacks
    assert summary.num_experts == (4 if arch in MOE else 0)
    desc = descriptor_for(arch)
    assert [n for n in names if len(desc.matches(n)) != 1] == []  # no name matches two templates


@pytest.mark.parametrize("arch", MOE)
def test_experts_and_routers_per_layer_on_disk(arch, tiny_checkpoint):
    with Checkpoint(tiny_checkpoint(arch)) as ckpt:
        summary = describe(ckpt.names(), ckpt.config)
    stacks = ("decoder", "encoder") if arch == "switch_transformers" else (None,)
    layer_keys = [(s, layer) for s in stacks for layer in MOE_LAYERS[arch]]
    assert list(summary.experts) == layer_keys
    assert all(found == (0, 1, 2, 3) for found in summary.experts.values())
    routers = summary.by_layer("router")
    per_router = 2 if arch == "deepseek_v3" else 1  # V3: weight + e_score_correction_bias
    assert list(routers) == layer_keys and all(len(v) == per_router for v in routers.values())
    for key, names in summary.by_layer("expert").items():
        per_expert: dict[int, set[str]] = {}
        for name in names:
            role = summary.roles[name]
            assert role.expert_dim is None  # one tensor per expert on disk
            per_expert.setdefault(role.expert, set()).add(role.module)
        assert per_expert == {e: EXPERT_MODULES[arch] for e in range(4)}, key


def test_mixtral_disk_names_and_roles(tiny_checkpoint):
    with Checkpoint(tiny_checkpoint("mixtral")) as ckpt:
        names = set(ckpt.names())
    assert "model.layers.1.block_sparse_moe.experts.3.w1.weight" in names
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    role = classify("model.layers.1.block_sparse_moe.experts.3.w1.weight", "mixtral")
    assert role == TensorRole("expert", layer=1, expert=3, module="w1")
    assert classify("model.layers.0.block_sparse_moe.gate.weight", {"model_type": "mixtral"}) == TensorRole(
        "router", layer=0, module="gate"
    )


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_describe_in_memory_names(arch):
    model = tiny_model(arch)
    state = model.state_dict()
    summary = describe(list(state), model.config)
    assert summary.other == ()
    desc = descriptor_for(arch)
    assert [n for n in state if len(desc.matches(n)) != 1] == []
    assert summary.num_layers == 2
    assert summary.num_experts == (4 if arch in MOE else 0)
    # in memory the tied copies are present too
    assert "lm_head.weight" in summary.groups["lm_head"]


@pytest.mark.parametrize("arch", FUSED)
def test_fused_experts_in_memory(arch):
    state = tiny_model(arch).state_dict()
    summary = describe(list(state), tiny_config(arch))
    fused = {n: summary.roles[n] for n in summary.groups["expert"]}
    layers = MOE_LAYERS[arch]
    assert sorted(fused) == sorted(
        f"model.layers.{i}.mlp.experts.{m}" for i in layers for m in ("gate_up_proj", "down_proj")
    )
    for name, role in fused.items():
        assert role.expert is None and role.expert_dim == 0 and role.fused
        assert state[name].shape[role.expert_dim] == 4  # (E, ...)
    assert summary.experts == {(None, i): (0, 1, 2, 3) for i in layers}
    routers = {k: tuple(n for n in v if n.endswith(".weight")) for k, v in summary.by_layer("router").items()}
    assert routers == {(None, i): (f"model.layers.{i}.mlp.gate.weight",) for i in layers}


@pytest.mark.parametrize("arch", FUSED)
def test_fused_parts_match_disk_tensors(arch, tiny_checkpoint):
    """The descriptor's parts/part_dim say how a fused tensor splits into the on-disk per-expert ones."""
    state = tiny_model(arch, seed=0).state_dict()
    mem = describe(list(state), tiny_config(arch))
    with Checkpoint(tiny_checkpoint(arch, seed=0)) as ckpt:
        disk = describe(ckpt.names(), ckpt.config)
        by_key = {(r.layer, r.expert, r.module): n for n, r in disk.roles.items() if r.group == "expert"}
        checked = 0
        for name in mem.groups["expert"]:
            role = mem.roles[name]
            fused = state[name]  # (E, len(parts) * out, in)
            chunks = fused.chunk(len(role.parts), dim=role.part_dim) if role.part_dim is not None else (fused,)
            for part, chunk in zip(role.parts, chunks, strict=True):
                for e in range(fused.shape[role.expert_dim]):
                    expected = ckpt.read(by_key[(role.layer, e, part)])  # (out, in)
                    torch.testing.assert_close(chunk.select(role.expert_dim, e), expected, rtol=0, atol=0)
                    checked += 1
    assert checked == len(MOE_LAYERS[arch]) * 4 * 3  # layers x experts x (gate, up, down)


def test_gpt2_conv1d_is_fan_in_fan_out():
    model = tiny_model("gpt2")
    state = model.state_dict()
    desc = descriptor_for("gpt2")
    flagged = sorted(n for n in state if desc.classify(n).fan_in_fan_out)
    assert flagged == sorted(
        f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert tuple(state["transformer.h.0.attn.c_attn.weight"].shape) == (64, 3 * 64)  # (in, out)
    assert not desc.classify("transformer.h.0.attn.c_attn.bias").fan_in_fan_out
    assert desc.classify("h.0.attn.c_attn.weight").layer == 0  # original OpenAI names, no prefix


def test_t5_stacks_and_relative_attention_bias():
    desc = descriptor_for("t5")
    assert desc.classify("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight") == TensorRole(
        "position", layer=0, stack="encoder", module="relative_attention_bias"
    )
    assert desc.classify("decoder.block.1.layer.1.EncDecAttention.k.weight") == TensorRole(
        "attention", layer=1, stack="decoder", module="EncDecAttention.k"
    )
    assert desc.classify("decoder.block.1.layer.2.DenseReluDense.wo.weight") == TensorRole(
        "mlp", layer=1, stack="decoder", module="wo"
    )
    assert desc.classify("encoder.embed_tokens.weight") == TensorRole("embedding", stack="encoder", module="embed_tokens")


def test_switch_dense_and_sparse_blocks(tmp_path):
    # one sparse layer per stack: sparse step 2, so block 1 is sparse and block 0 dense
    from expertkit.models.tiny import save_tiny

    path = save_tiny("switch_transformers", tmp_path / "m", num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    with Checkpoint(path) as ckpt:
        summary = describe(ckpt.names(), ckpt.config)
    assert summary.other == ()
    assert list(summary.experts) == [("decoder", 1), ("encoder", 1)]
    assert sorted(summary.by_layer("mlp")) == [("decoder", 0), ("encoder", 0)]


def test_unknown_model_type_falls_back_with_warning(tiny_checkpoint):
    with Checkpoint(tiny_checkpoint("mixtral")) as ckpt:
        names = ckpt.names()
    with pytest.warns(InferredArchitectureWarning, match="'mystery_moe'.*inferred"):
        summary = describe(names, {"model_type": "mystery_moe"})
    assert summary.inferred and summary.architecture == "generic" and summary.model_type == "mystery_moe"
    assert summary.num_layers == 2 and summary.num_experts == 4
    assert {k: len(v) for k, v in summary.by_layer("router").items()} == {(None, 0): 1, (None, 1): 1}
    assert len(summary.groups["expert"]) == 24 and summary.other == ()


def test_fallback_on_fused_names_and_unfamiliar_layout():
    state = tiny_model("qwen2_moe").state_dict()
    with pytest.warns(InferredArchitectureWarning, match="None"):
        summary = describe(list(state), {"num_experts": 4})  # config without model_type
    assert summary.num_experts == 4 and summary.experts[(None, 1)] == (0, 1, 2, 3)
    assert {summary.roles[n].expert_dim for n in summary.groups["expert"]} == {0}
    names = [
        "backbone.tok_embeddings.weight",
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.blocks.0.moe.router.weight",
        "backbone.blocks.0.moe.experts.2.fc_in.weight",
        "backbone.blocks.1.moe.experts.0.fc_out.weight",
        "backbone.blocks.1.ln_attn.weight",
        "backbone.final_norm.weight",
        "something.else",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InferredArchitectureWarning):
            describe(names)
    with pytest.warns(InferredArchitectureWarning):
        summary = describe(names)
    roles = [summary.roles[n] for n in names]
    assert [r.group for r in roles] == [
        "embedding", "attention", "router", "expert", "expert", "norm", "final_norm", "other",
    ]  # fmt: skip
    assert (roles[3].layer, roles[3].expert, roles[3].module) == (0, 2, "fc_in")
    assert summary.num_layers == 2 and summary.other == ("something.else",)


def test_descriptor_for_inputs():
    assert descriptor_for("qwen2_moe").name == "qwen2_moe"
    assert descriptor_for({"model_type": "mt5"}).name == "t5"
    assert descriptor_for(tiny_config("gpt2")).name == "gpt2"
    assert descriptor_for("bert") is None and descriptor_for({}) is None
    with pytest.raises(UnknownNameError, match="Did you mean 'mixtral'"):
        descriptor_for("mixtrall", strict=True)
    with pytest.raises(UnknownNameError):
        classify("x.weight", "bert")
    assert descriptor_for("mixtral").num_experts({"num_local_experts": 8}) == 8
    assert descriptor_for("mixtral").top_k(tiny_config("mixtral").to_dict()) == 2
    with pytest.raises(UnknownNameError, match="Did you mean 'expert'"):
        describe(["lm_head.weight"], {"model_type": "llama"}).by_layer("experts")
    assert set(describe([], {"model_type": "llama"}).groups) == set(GROUPS)


GOOD = """\
name: toy
model_types: [toy]
vars:
  lay: 'layers\\.{layer}\\.'
groups:
  attention:
    - '{lay}attn\\.(?P<module>q|k)\\.weight'
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("model_types: [toy]", "model_type: [toy]"), r"unknown key 'model_type'\. Did you mean 'model_types'"),
        (("  attention:", "  atention:"), r"unknown group 'atention'\. Did you mean 'attention'"),
        (("(?P<module>q|k)", "(?P<module>q|k"), r"invalid regex"),
        (("{lay}attn", "{lyr}attn"), r"unknown placeholder '\{lyr\}'\. Did you mean 'layer'"),
        (("'layers\\.{layer}\\.'", "'layers\\.0\\.'"), r"must capture the layer index"),
        (("name: toy", "name: toy\nname: toy2"), r"duplicate key 'name'"),
        (("    - '{lay}", "    - pattern: '{lay}"), None),  # still valid: mapping form
        (("    - '{lay}attn\\.(?P<module>q|k)\\.weight'", "    - {pattern: 'x', expert_dm: 0}"),
         r"unknown key 'expert_dm'\. Did you mean 'expert_dim'"),
        (("  attention:", "  expert:"), r"exactly one of \{expert\}"),
        (("groups:", "counts: {layerz: [n]}\ngroups:"), r"unknown key 'counts\.layerz'\. Did you mean 'layers'"),
    ],
)  # fmt: skip
def test_malformed_descriptor_is_a_clear_error(tmp_path: Path, change, message):
    path = tmp_path / "toy.yaml"
    path.write_text(GOOD.replace(*change))
    if message is None:
        desc = load_descriptor(path)
        assert desc.classify("layers.3.attn.k.weight") == TensorRole("attention", layer=3, module="k")
        return
    with pytest.raises(ConfigError, match=message) as info:
        load_descriptor(path)
    assert "toy.yaml" in str(info.value)


def test_qwen2_moe_dense_layer_is_mlp():
    state = tiny_model("qwen2_moe", mlp_only_layers=[0]).state_dict()
    summary = describe(list(state), tiny_config("qwen2_moe", mlp_only_layers=[0]))
    assert summary.other == ()
    assert {k: len(v) for k, v in summary.by_layer("mlp").items()} == {(None, 0): 3}
    assert list(summary.experts) == [(None, 1)] and list(summary.by_layer("router")) == [(None, 1)]
