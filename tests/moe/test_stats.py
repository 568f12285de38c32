"""Routing statistics: hooks count exactly the tokens routed, on every MoE architecture; known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from expertkit.models.tiny import tiny_model, tiny_tokenizer
from expertkit.moe.collect import collect_routing_stats
from expertkit.moe.routing import NotAnMoeError, RoutingTap
from expertkit.moe.stats import RoutingStats

MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "switch_transformers")
PROMPTS = {"a": ["hello world", "abc", "the quick brown fox jumps"], "b": ["xyz 123", "MoE routing!"]}


def _manual_choice(arch: str, router: torch.nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, E)`` 0/1 choices computed by hand from the router's weight and its input ``x`` ``(N, H)``."""
    weight = router.classifier.weight if arch == "switch_transformers" else router.weight  # (E, H)
    logits = x.double() @ weight.double().T  # (N, E)
    if arch == "deepseek_v3":  # sigmoid scores + per-expert bias, used for choosing only (one group)
        scores = logits.sigmoid() + router.e_score_correction_bias.double()
    else:  # softmax is monotonic: top-k of the probabilities = top-k of the logits
        scores = logits
    idx = scores.topk(k, dim=-1).indices  # (N, k)
    return torch.zeros_like(logits).scatter_(1, idx, 1.0)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_counts_equal_a_manual_top_k_over_router_logits(arch):
    model = tiny_model(arch, seed=3)
    tok = tiny_tokenizer()
    stats = collect_routing_stats(model, tok, PROMPTS, batch_size=2, sample_tokens=4)
    # the reference: capture each router's input on the same forward passes, choose by hand
    k = 1 if arch == "switch_transformers" else model.config.num_experts_per_tok
    taps = RoutingTap(model, lambda event: None)
    manual = {name: np.zeros(stats.num_experts) for name in stats.layers}
    co = {name: np.zeros((stats.num_experts, stats.num_experts)) for name in stats.layers}
    from expertkit.moe.collect import _batches
    from expertkit.moe.routing import layer_name

    handles, captured = [], {}
    for key, (router, _e, _n) in taps.layers.items():
        handles.append(router.register_forward_hook(
            lambda m, inp, out, key=key: captured.__setitem__(key, inp[0].reshape(-1, inp[0].shape[-1]))))
    try:
        with torch.no_grad():
            for group in PROMPTS.values():
                for ids, mask in _batches(tok, group, 2, 256):
                    extra = {"decoder_input_ids": torch.zeros(ids.shape[0], 1, dtype=torch.long)} \
                        if model.config.is_encoder_decoder else {}
                    model(input_ids=ids, attention_mask=mask, **extra)
                    for key, x in captured.items():
                        real = mask.reshape(-1).bool() if x.shape[0] == mask.numel() else torch.ones(x.shape[0], dtype=torch.bool)
                        choice = _manual_choice(arch, taps.layers[key][0], x, k)[real]
                        manual[layer_name(key)] += choice.sum(0).numpy()
                        co[layer_name(key)] += (choice.T @ choice).numpy()
    finally:
        for h in handles:
            h.remove()
    for i, name in enumerate(stats.layers):
        np.testing.assert_array_equal(stats.counts[i], manual[name], err_msg=f"{arch} layer {name}")
        np.testing.assert_array_equal(stats.coactivation[i], co[name])
    real_tokens = sum(int(m.sum()) for g in PROMPTS.values() for _, m in _batches(tok, g, 2, 256))
    decoder_only = [i for i, n in enumerate(stats.layers) if not n.startswith("decoder.")]
    assert all(stats.tokens[i] == real_tokens for i in decoder_only)  # padding never counted
    assert all(stats.counts[i].sum() == k * real_tokens for i in decoder_only)


def _forced_mixtral(rows: torch.Tensor, *, identical_experts: bool = False):
    """A tiny Mixtral whose routers of both layers are ``rows`` ``(4, 64)``."""
    model = tiny_model("mixtral", seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.copy_(rows)
            if identical_experts:
                layer.mlp.experts.gate_up_proj.copy_(layer.mlp.experts.gate_up_proj[:1].expand_as(
                    layer.mlp.experts.gate_up_proj))
                layer.mlp.experts.down_proj.copy_(layer.mlp.experts.down_proj[:1].expand_as(
                    layer.mlp.experts.down_proj))
    return model


def test_one_sided_router_gives_known_frequencies_entropy_and_balance():
    # logits (s, s, -s, -s) with s = sum(x): top-2 is {0, 1} when s > 0 and {2, 3} when s < 0
    rows = torch.zeros(4, 64)
    rows[0] = rows[1] = 1.0
    rows[2] = rows[3] = -1.0
    model = _forced_mixtral(rows)
    stats = collect_routing_stats(model, tiny_tokenizer(), PROMPTS, batch_size=5, sample_tokens=0)
    # every token chooses {0,1} (sum(x) > 0) or {2,3} (sum(x) < 0): co-activation is block-diagonal
    co = stats.coactivation
    assert co[:, 0, 2].sum() == co[:, 0, 3].sum() == co[:, 1, 2].sum() == co[:, 1, 3].sum() == 0
    np.testing.assert_array_equal(stats.counts[:, 0], stats.counts[:, 1])
    np.testing.assert_array_equal(stats.counts[:, 2], stats.counts[:, 3])
    # identical router rows have cosine 1, opposite rows cosine -1
    sim = stats.logit_similarity()
    np.testing.assert_allclose(sim[:, 0, 1], 1.0, atol=1e-9)
    np.testing.assert_allclose(sim[:, 0, 2], -1.0, atol=1e-9)
    # entropy from the counts by hand
    for i in range(len(stats.layers)):
        p = stats.counts[i] / stats.counts[i].sum()
        expected = -sum(q * math.log2(q) for q in p if q > 0)
        assert stats.marginal_entropy()[i] == pytest.approx(expected)
        assert stats.balance_cv()[i] == pytest.approx(float(np.std(stats.counts[i]) / np.mean(stats.counts[i])))


def test_task_conditional_entropy_below_marginal_when_tasks_route_apart():
    stats = RoutingStats.empty(["0"], 4, 2, 0, False)
    stats.task_counts = {"a": np.array([[10.0, 10.0, 0, 0]]), "b": np.array([[0, 0, 10.0, 10.0]])}
    stats.task_tokens = {"a": 10, "b": 10}
    stats.counts = stats.task_counts["a"] + stats.task_counts["b"]
    assert stats.marginal_entropy()[0] == pytest.approx(2.0)  # uniform over 4 experts
    assert stats.conditional_entropy()[0] == pytest.approx(1.0)  # each task: uniform over 2
    assert stats.balance_cv()[0] == pytest.approx(0.0)


def test_identical_experts_have_output_similarity_one():
    model = _forced_mixtral(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), identical_experts=True)
    stats = collect_routing_stats(model, tiny_tokenizer(), PROMPTS, batch_size=2, sample_tokens=3)
    assert stats.output_tokens.min() > 0
    np.testing.assert_allclose(stats.output_similarity(), 1.0, atol=1e-5)
    # the mean outputs are identical too
    np.testing.assert_allclose(stats.output_mean[:, 0], stats.output_mean[:, 3], rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    stats = collect_routing_stats(tiny_model("olmoe"), tiny_tokenizer(), PROMPTS, batch_size=2, sample_tokens=2)
    path = stats.save(tmp_path / "stats.npz")
    back = RoutingStats.load(path)
    assert back.layers == stats.layers and back.task_tokens == stats.task_tokens
    for name in ("counts", "coactivation", "logit_gram", "output_cos", "output_mean"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    np.testing.assert_array_equal(back.task_counts["b"], stats.task_counts["b"])
    assert back.summary() == stats.summary()


def test_dense_model_is_refused_with_its_architecture():
    with pytest.raises(NotAnMoeError, match=r"'llama' \(llama\) is a dense architecture"):
        collect_routing_stats(tiny_model("llama"), tiny_tokenizer(), PROMPTS)


def test_unknown_architecture_says_what_to_add():
    model = tiny_model("mixtral")
    model.config.model_type = "my_moe"
    with pytest.raises(NotAnMoeError, match=r"Add weights/arch/<name>.yaml with a 'routing' section"):
        collect_routing_stats(model, tiny_tokenizer(), PROMPTS)


def test_cached_statistics_follow_the_routers_in_memory(tmp_path, monkeypatch):
    """The cache keys the model by every weight: retraining only the routers (tensors the sampled
    folder fingerprint may not read) must not return the old routing."""
    from expertkit.models.loader import LoadedModel
    from expertkit.moe.collect import routing_stats

    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path))
    model = tiny_model("mixtral", seed=3)
    loaded = LoadedModel("tiny-mixtral", model, tiny_tokenizer(), None, "fingerprint-of-the-folder")
    first = routing_stats(loaded, ["family_relation"], n=4, batch_size=2, sample_tokens=0)
    assert routing_stats(loaded, ["family_relation"], n=4, batch_size=2, sample_tokens=0).counts.tolist() \
        == first.counts.tolist()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.neg_()  # every router reversed: the top-k choices change
    second = routing_stats(loaded, ["family_relation"], n=4, batch_size=2, sample_tokens=0)
    assert second.meta["fingerprint"] != first.meta["fingerprint"]
    assert second.counts.tolist() != first.counts.tolist()
    assert len(list((tmp_path / "moe-stats").glob("*.npz"))) == 2


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "switch_transformers"])
def test_one_call_expert_outputs_equal_each_expert_called_alone(arch):
    from expertkit.moe.routing import expert_outputs

    model = tiny_model(arch, seed=5)
    tap = RoutingTap(model, lambda event: None)
    experts = next(iter(tap.layers.values()))[1]
    hidden = torch.randn(7, model.config.hidden_size if arch != "switch_transformers" else model.config.d_model,
                         generator=torch.Generator().manual_seed(0))
    got = expert_outputs(experts, hidden, tap.num_experts, tap.routing.expert_call)  # (E, 7, H)
    for e in range(tap.num_experts):  # the reference: expert e alone, on the tokens alone
        if tap.routing.expert_call == "dispatch":
            route = torch.zeros(7, 1, tap.num_experts, dtype=torch.long)
            route[:, 0, e] = 1
        else:
            route = torch.full((7, 1), e, dtype=torch.long)
        with torch.no_grad():
            want = experts(hidden, route, torch.ones(7, 1)).reshape(7, -1)
        torch.testing.assert_close(got[e], want, rtol=1e-5, atol=1e-6)


def test_deferred_output_sampling_equals_sampling_every_batch(monkeypatch):
    """Sampled tokens wait and go through the experts together: the same sums as one call per batch."""
    from expertkit.moe import collect

    model, tok = tiny_model("mixtral", seed=3), tiny_tokenizer()
    late = collect_routing_stats(model, tok, PROMPTS, batch_size=2, sample_tokens=3)
    monkeypatch.setattr(collect._Accumulator, "FLUSH_AT", 1)  # flush at every event: the old behaviour
    every = collect_routing_stats(model, tok, PROMPTS, batch_size=2, sample_tokens=3)
    assert late.output_tokens.tolist() == every.output_tokens.tolist() and late.output_tokens.min() > 0
    np.testing.assert_allclose(late.output_cos, every.output_cos, rtol=1e-5, atol=1e-5)  # float32 sums
    np.testing.assert_allclose(late.output_mean, every.output_mean, rtol=1e-5, atol=1e-6)


def test_cached_reap_scores_follow_the_routers_in_memory(tmp_path, monkeypatch):
    from expertkit.models.loader import LoadedModel
    from expertkit.moe.compress.api import cached_reap

    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path))
    model = tiny_model("mixtral", seed=3)
    loaded = LoadedModel("tiny-mixtral", model, tiny_tokenizer(), None, "fingerprint-of-the-folder")
    first = cached_reap(loaded, PROMPTS, batch_size=2)
    np.testing.assert_array_equal(cached_reap(loaded, PROMPTS, batch_size=2), first)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.neg_()
    assert not np.array_equal(cached_reap(loaded, PROMPTS, batch_size=2), first)
    assert len(list((tmp_path / "moe-stats").glob("reap-*.npy"))) == 2
