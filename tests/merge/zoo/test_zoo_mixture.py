"""FFN-level (dense -> Mixtral) and model-level mixtures on tiny models."""

from __future__ import annotations

import pytest
import torch

from expertkit.errors import ConfigError, IncompatibleModelsError
from expertkit.merge.mixture import (
    SequenceRouter,
    dense_to_mixtral,
    evaluate_routed,
    hidden_state_routers,
    routers_from_means,
    train_routers,
)
from expertkit.models import load_model
from expertkit.models.tiny import save_tiny, tiny_model, tiny_tokenizer
from expertkit.tasks import evaluate
from expertkit.tasks.toy import lohi_task

PROMPTS = [["aaaa:", "abab:", "baba:", "aabb:"], ["zzzz:", "zyzy:", "yzyz:", "yyzz:"]]


def test_mixture_with_a_router_fixed_on_expert_k_equals_dense_model_k(tmp_path, dense_with_own_mlps, force_expert):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    folders = dense_with_own_mlps([1, 2, 3])
    out = dense_to_mixtral(folders, tmp_path / "moe", top_k=1)
    moe = MixtralForCausalLM.from_pretrained(out).eval()
    assert moe.config.num_local_experts == 3 and moe.config.num_experts_per_tok == 1
    ids = torch.tensor([[5, 17, 30, 44, 9, 60, 71]])
    for k, folder in enumerate(folders):
        force_expert(moe, k)
        dense = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)


def test_mixture_averages_non_mlp_tensors_and_stores_given_routers(tmp_path):
    from safetensors import safe_open

    a, b = save_tiny("llama", tmp_path / "a", 1), save_tiny("llama", tmp_path / "b", 2)
    router = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64)
    out = dense_to_mixtral([a, b], tmp_path / "moe", routers={1: router})
    q = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb, \
            safe_open(out / "model.safetensors", "pt") as fo:
        torch.testing.assert_close(fo.get_tensor(q), (fa.get_tensor(q) + fb.get_tensor(q)) / 2)
        assert torch.equal(fo.get_tensor("model.layers.1.block_sparse_moe.experts.1.w3.weight"),
                           fb.get_tensor("model.layers.1.mlp.up_proj.weight"))
        assert torch.equal(fo.get_tensor("model.layers.1.block_sparse_moe.gate.weight"), router)
        assert torch.equal(fo.get_tensor("model.layers.0.block_sparse_moe.gate.weight"), torch.zeros(2, 64))


def test_mixture_refuses_mismatched_models_and_leaves_no_output(tmp_path):
    a = save_tiny("llama", tmp_path / "a", 1)
    narrow = save_tiny("llama", tmp_path / "n", 1, hidden_size=32, intermediate_size=64)
    with pytest.raises(IncompatibleModelsError, match="names or shapes"):
        dense_to_mixtral([a, narrow], tmp_path / "moe")
    gpt2 = save_tiny("gpt2", tmp_path / "g", 1)
    with pytest.raises(ConfigError, match="llama or mistral"):
        dense_to_mixtral([gpt2, gpt2], tmp_path / "moe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "g", "n"]


def test_routers_from_means_are_centred_unit_directions():
    means = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (L=1, E=2, H=2)
    r = routers_from_means(means, scale=2.0)[0]
    s = 2.0 / 2**0.5
    torch.testing.assert_close(r, torch.tensor([[s, -s], [-s, s]]))


def _routed(moe, tok):
    """For each expert's prompts, the fraction of (layer, token) routing decisions that pick it."""
    picked = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _i, out, k=k: picked.__setitem__(k, out[2]))
             for k, layer in enumerate(moe.model.layers)]
    fractions = []
    try:
        for expert, group in enumerate(PROMPTS):
            ids = torch.tensor([tok.encode(p) for p in group])
            with torch.no_grad():
                moe(ids)
            fractions.append(float(torch.stack([(picked[k] == expert).float().mean() for k in picked]).mean()))
    finally:
        for h in hooks:
            h.remove()
    return fractions


def test_hidden_state_routers_send_each_experts_prompts_to_it(tmp_path, dense_with_own_mlps):
    from transformers import MixtralForCausalLM

    folders = dense_with_own_mlps([1, 2])
    tok = tiny_tokenizer()
    routers = hidden_state_routers(tiny_model("llama", 0), tok, PROMPTS, scale=5.0)
    assert sorted(routers) == [0, 1] and routers[0].shape == (2, 64)
    torch.testing.assert_close(routers[0].norm(dim=1), torch.full((2,), 5.0))
    moe = MixtralForCausalLM.from_pretrained(dense_to_mixtral(folders, tmp_path / "moe", routers=routers)).eval()
    assert min(_routed(moe, tok)) >= 0.9
    zero = MixtralForCausalLM.from_pretrained(dense_to_mixtral(folders, tmp_path / "moe0")).eval()
    assert _routed(zero, tok) == [1.0, 0.0]  # all-zero routers: ties go to expert 0


def test_router_training_learns_the_routing_from_zero_routers(tmp_path, dense_with_own_mlps):
    from transformers import MixtralForCausalLM

    folders = dense_with_own_mlps([1, 2])
    tok = tiny_tokenizer()
    moe = MixtralForCausalLM.from_pretrained(dense_to_mixtral(folders, tmp_path / "moe")).eval()
    before = {n: p.clone() for n, p in moe.named_parameters()}
    losses = train_routers(moe, tok, PROMPTS, steps=20, lr=0.05, batch_size=8)
    assert losses[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)  # uniform logits
    assert losses[-1] < 0.5 * losses[0]
    assert min(_routed(moe, tok)) >= 0.9
    changed = sorted(n for n, p in moe.named_parameters() if not torch.equal(p, before[n]))
    assert changed == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]


def _char_embed(prompts):
    """A toy embedder: letter counts."""
    out = torch.zeros(len(prompts), 26)
    for i, p in enumerate(prompts):
        for c in p:
            if c.isalpha():
                out[i, ord(c.lower()) - 97] += 1
    return out


def test_sequence_router_routes_by_nearest_centroid_and_round_trips(tmp_path):
    router = SequenceRouter.fit(["early", "late"], PROMPTS, _char_embed, "toy")
    assert router.route(["abba:", "zyyy:", "bbbb:"], _char_embed) == [0, 1, 0]
    router.save(tmp_path)
    again = SequenceRouter.load(tmp_path)
    assert again.names == ["early", "late"] and again.embedder == "toy"
    torch.testing.assert_close(again.centroids, router.centroids)


def test_evaluate_routed_scores_each_example_with_the_model_it_was_routed_to(tmp_path):
    models = [load_model(save_tiny("llama", tmp_path / f"m{k}", k + 1)) for k in range(2)]
    task = lohi_task()
    router = SequenceRouter.fit(["lo", "hi"], [["abc:", "cde:"], ["xyz:", "vwx:"]], _char_embed)
    res = evaluate_routed(models, router, task, _char_embed, split="test", n=12)
    examples = task.examples("test", 12, 0)
    picks = router.route([e.prompt for e in examples], _char_embed)
    assert picks == [0 if e.answer == "lo" else 1 for e in examples]
    alone = [evaluate(m, None, task, split="test", n=12).scores for m in models]
    assert res["scores"] == [alone[p][i] for i, p in enumerate(picks)]
    assert res["routed"] == {"lo": picks.count(0), "hi": picks.count(1)}
