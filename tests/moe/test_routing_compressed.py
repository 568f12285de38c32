"""Routing statistics, REAP scores and the shared forward loop on a compressed MoE whose layers keep
different numbers of experts (MC-SMoE's adaptive per-layer counts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from expertkit.models import load_model
from expertkit.models.tiny import tiny_model, tiny_tokenizer
from expertkit.moe.collect import _batches, collect_routing_stats
from expertkit.moe.compress import METHODS, LayerStats, compress_checkpoint
from expertkit.moe.compress.reap import reap_scores
from expertkit.moe.routing import RoutingTap, forward_batches
from expertkit.moe.stats import RoutingStats

PROMPTS = {"a": ["hello world", "abc", "the quick brown fox jumps"], "b": ["xyz 123", "MoE routing!"]}
KEEP = [3, 2]  # layer 0 keeps 3 of 4 experts, layer 1 keeps 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``{"src", "msmoe", "prune_frequency"}``: a tiny Mixtral (4 experts, top-2) and two compressions of it."""
    root = tmp_path_factory.mktemp("per-layer")
    model = tiny_model("mixtral", 0)
    model.save_pretrained(root / "src")
    tiny_tokenizer().save_pretrained(root / "src")
    rng = np.random.default_rng(0)
    stats = LayerStats(rng.dirichlet(np.ones(4), size=2), np.stack([np.corrcoef(rng.normal(size=(4, 6)))] * 2),
                       None, None)
    out = {"src": root / "src"}
    for method in ("msmoe", "prune_frequency"):
        out[method] = compress_checkpoint(root / "src", root / method, method=method,
                                          params=METHODS.get(method).params(), stats=stats, keep=KEEP).path
    return out


def _real_tokens(tok) -> int:
    return sum(int(mask.sum()) for group in PROMPTS.values() for _ids, mask in _batches(tok, group, 2, 256))


def test_pruned_layers_count_tokens_times_top_k_in_their_own_width(folders, tmp_path):
    loaded = load_model(folders["prune_frequency"])
    stats = collect_routing_stats(loaded.model, loaded.tokenizer, PROMPTS, batch_size=2, sample_tokens=4)
    n = _real_tokens(loaded.tokenizer)
    assert stats.layer_experts == KEEP and stats.num_experts == 3 and stats.top_k == 2
    for i, e in enumerate(KEEP):
        layer = stats.layer(i)
        assert layer["counts"].shape == (e,) and layer["coactivation"].shape == (e, e)
        assert layer["output_cos"].shape == (e, e) and layer["output_mean"].shape == (e, 64)
        assert stats.tokens[i] == n
        assert layer["counts"].sum() == n * 2  # every token goes to 2 distinct kept experts
        np.testing.assert_array_equal(np.diagonal(layer["coactivation"]), layer["counts"])
        assert not stats.counts[i, e:].any() and not stats.logit_gram[i, e:].any()  # past the layer: nothing
        np.testing.assert_allclose(np.diagonal(layer["output_cos"]), stats.output_tokens[i], rtol=1e-5)  # cos(x, x) = 1
        for task, tokens in stats.task_tokens.items():
            assert stats.task_counts[task][i, :e].sum() == tokens * 2
    assert stats.balance_cv()[1] == pytest.approx(np.std(stats.counts[1, :2]) / np.mean(stats.counts[1, :2]))
    again = RoutingStats.load(stats.save(tmp_path / "s.npz"))
    assert again.layer_experts == KEEP and again.layer(1)["counts"].shape == (2,)


def test_group_routed_layer_0_counts_equal_the_original_top_2_mapped_to_groups(folders):
    """Layer 0's router sees the same inputs in the original and the compressed model, so its group counts
    are the original router's top-2 experts mapped through the layout's group map (distinct groups per token)."""
    original, comp = load_model(folders["src"]), load_model(folders["msmoe"])
    gmap = torch.tensor(json.loads((folders["msmoe"] / "config.json").read_text())
                        ["expertkit_compressed_moe"]["layers"]["0"]["group_map"])  # (4,)
    expected = torch.zeros(3)
    tap = RoutingTap(original.model)

    def sink(event):
        if event.key == (None, 0):
            groups = torch.zeros(event.chosen.shape[0], 3)  # (N, 3)
            for e in range(4):
                groups[:, gmap[e]] = torch.maximum(groups[:, gmap[e]], event.chosen[:, e])
            expected.add_(groups[event.mask].sum(0))

    tap.sink = sink
    batches = [b for group in PROMPTS.values() for b in _batches(original.tokenizer, group, 2, 256)]
    with tap:
        forward_batches(original.model, batches, "reference", watchers=[tap])
    stats = collect_routing_stats(comp.model, comp.tokenizer, PROMPTS, batch_size=2, sample_tokens=0)
    assert stats.layer_experts == KEEP
    np.testing.assert_array_equal(stats.layer(0)["counts"], expected.numpy())
    assert expected.sum() <= 2 * _real_tokens(comp.tokenizer)
    assert stats.layer(1)["counts"].shape == (2,) and stats.layer(1)["counts"].sum() > 0


def test_reap_scores_fill_each_layers_own_experts(folders):
    loaded = load_model(folders["prune_frequency"])
    scores = reap_scores(loaded.model, loaded.tokenizer, PROMPTS, batch_size=2)  # (L, E)
    assert scores.shape == (2, 3)
    assert (scores[0] > 0).all() and (scores[1, :2] > 0).all() and scores[1, 2] == 0


def test_forward_batches_sets_masks_calls_before_and_restores_training_mode():
    model = tiny_model("mixtral", 1).train()
    tok = tiny_tokenizer()
    batches = list(_batches(tok, ["ab", "abcdef", "a"], 2, 256))

    class Watcher:
        mask = None
        seen: list[torch.Tensor] = []

    w, order = Watcher(), []

    def before(i):
        order.append(i)
        Watcher.seen.append(w.mask)
        assert not model.training  # eval mode during the passes

    forward_batches(model, batches, "test", watchers=[w], before=before)
    assert order == [0, 1] and model.training
    assert all(torch.equal(a, b[1]) for a, b in zip(Watcher.seen, batches, strict=True))
    with pytest.raises(IndexError):  # a failing pass (token id past the vocabulary) still restores the mode
        forward_batches(model, [(torch.full((1, 3), 10**6), torch.ones(1, 3))], "bad")
    assert model.training
