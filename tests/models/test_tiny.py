"""Tiny random model builders: sizes, determinism by seed, save/load round trip, tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from expertkit.errors import ConfigError, UnknownNameError
from expertkit.models.tiny import TINY_ARCHS, save_tiny, tiny_config, tiny_model, tiny_tokenizer
from expertkit.weights.reader import Checkpoint

SEQ2SEQ = ("t5", "switch_transformers")
# (experts, experts per token) of the MoE tiny models; Switch routes top-1 by design.
MOE = {"mixtral": (4, 2), "qwen2_moe": (4, 2), "qwen3_moe": (4, 2), "olmoe": (4, 2), "deepseek_v2": (4, 2),
       "deepseek_v3": (4, 2), "switch_transformers": (4, 1)}
EXPERT_KEYS = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
               "olmoe": "num_experts", "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts",
               "switch_transformers": "num_experts"}


def _forward(model, arch: str) -> torch.Tensor:
    ids = torch.tensor([[5, 9, 44, 77, 4, 88, 2]])  # (batch=1, seq=7)
    with torch.no_grad():
        if arch in SEQ2SEQ:
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits  # (1, 4, vocab)
        return model(input_ids=ids).logits  # (1, 7, vocab)


def test_tiny_archs():
    assert TINY_ARCHS == ("llama", "mistral", "qwen2", "gpt2", "t5", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                          "deepseek_v2", "deepseek_v3", "switch_transformers")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_config_sizes(arch):
    cfg = tiny_config(arch)
    assert cfg.model_type == arch
    assert cfg.hidden_size == 64 and cfg.vocab_size == 128
    assert cfg.num_hidden_layers == 2
    if arch in SEQ2SEQ:
        assert cfg.num_decoder_layers == 2
    if arch in MOE:
        experts, top_k = MOE[arch]
        assert getattr(cfg, EXPERT_KEYS[arch]) == experts
        if arch != "switch_transformers":
            assert cfg.num_experts_per_tok == top_k


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_is_deterministic_by_seed(arch):
    a, b, c = tiny_model(arch, seed=0), tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    assert not a.training and all(p.dtype == torch.float32 for p in a.parameters())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb) == list(sc)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    # every random matrix differs between seeds (norm weights start at 1 for every seed)
    matrices = [n for n, t in sa.items() if t.dim() >= 2]
    assert matrices and all(not torch.equal(sa[n], sc[n]) for n in matrices)
    la, lb, lc = _forward(a, arch), _forward(b, arch), _forward(c, arch)
    assert la.shape[-1] == 128
    assert torch.equal(la, lb) and not torch.allclose(la, lc)


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_save_and_reload_gives_same_logits(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
    assert json.loads((path / "config.json").read_text())["model_type"] == arch
    auto = AutoModelForSeq2SeqLM if arch in SEQ2SEQ else AutoModelForCausalLM
    reloaded = auto.from_pretrained(path).eval()
    fresh = tiny_model(arch)
    loaded = reloaded.state_dict()
    for name, tensor in fresh.state_dict().items():  # on-disk names convert back exactly
        assert torch.equal(loaded[name], tensor), name
    # switch_transformers differs by ~1e-6 after reload (same weights; float summation order)
    torch.testing.assert_close(_forward(reloaded, arch), _forward(fresh, arch), rtol=1e-5, atol=1e-5)
    with Checkpoint(path) as ckpt:
        assert ckpt.num_parameters > 0


def test_save_tiny_seed_and_tokenizer(tmp_path, tiny_checkpoint):
    path = save_tiny("llama", tmp_path / "m", seed=3, tokenizer=False)
    assert not (path / "tokenizer.json").exists()
    with Checkpoint(path) as ours, Checkpoint(tiny_checkpoint("llama", seed=0)) as theirs:
        name = "model.layers.0.self_attn.q_proj.weight"
        expected = tiny_model("llama", seed=3).state_dict()[name]  # (64, 64)
        assert torch.equal(ours.read(name), expected)
        assert not torch.equal(ours.read(name), theirs.read(name))
    assert (tiny_checkpoint("llama") / "tokenizer.json").exists()


def test_tiny_tokenizer_matches_model_ids():
    tok = tiny_tokenizer()
    assert tok("Hi ~")["input_ids"] == [44, 77, 4, 98]  # 'H'=72-28, ' '=4, '~'=98
    assert tok.decode(tok("2+2=4!")["input_ids"]) == "2+2=4!"
    assert tok("é")["input_ids"] == [3]  # unknown -> <unk>
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= tiny_config("llama").vocab_size
    cfg = tiny_config("t5")
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 2, 0)


def test_overrides_aliases_and_errors():
    cfg = tiny_config("qwen2_moe", mlp_only_layers=[0])
    assert cfg.mlp_only_layers == [0]
    sw = tiny_config("switch", num_sparse_encoder_layers=1)  # alias; derived sparse step follows
    assert sw.model_type == "switch_transformers" and sw.encoder_sparse_step == 2 and sw.decoder_sparse_step == 1
    with pytest.raises(ConfigError, match="unknown config key 'num_hiden_layers'. Did you mean 'num_hidden_layers'"):
        tiny_config("llama", num_hiden_layers=3)
    with pytest.raises(UnknownNameError, match="Did you mean 'mixtral'"):
        tiny_model("mixtrl")
    model = tiny_model("qwen2_moe", mlp_only_layers=[0])
    names = set(model.state_dict())
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.1.mlp.experts.gate_up_proj" in names
