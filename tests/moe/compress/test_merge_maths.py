"""Known answers of the merge maths: alignment, weighted merge, grouping, allocation, low rank + sparse."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.moe.compress import METHODS, StackedExperts
from expertkit.moe.compress.align import align_to
from expertkit.moe.compress.allocate import allocate
from expertkit.moe.compress.base import dominant_groups, merge_weights, merged_expert, weighted_merge
from expertkit.moe.compress.lowrank import factorize, split_budget

from .helpers import expert, layer, permuted_copies, swiglu


def test_alignment_recovers_the_permutation_of_a_permuted_copy():
    gate, up, down, perms = permuted_copies(4)
    for e in range(1, 4):
        p = align_to(gate[0], up[0], down[0], gate[e], up[e], down[e])
        # member neuron p[i] is anchor neuron i: p is the inverse of the permutation that made the copy
        assert torch.equal(perms[e][p], torch.arange(24))
        assert torch.equal(gate[e][p], gate[0]) and torch.equal(up[e][p], up[0]) and torch.equal(down[e][:, p], down[0])


def test_msmoe_merges_permuted_copies_back_to_the_expert_exactly():
    gate, up, down, _ = permuted_copies(4)
    lay = layer(gate, up, down, keep=1, frequencies=[0.1, 0.4, 0.3, 0.2])
    plan = METHODS.get("msmoe")(lay, METHODS.get("msmoe").params())
    anchor = 1  # the most frequent expert is the dominant one; the others are aligned onto it
    assert plan.groups == [[1, 0, 2, 3]] and plan.routing == "group"
    for got, want in zip(plan.expert(0), (gate[anchor], up[anchor], down[anchor]), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # without alignment the same copies average into a different function
    avg = METHODS.get("average")(lay, METHODS.get("average").params())
    x = torch.randn(5, 12)
    assert (swiglu(*avg.expert(0), x) - swiglu(gate[0], up[0], down[0], x)).abs().max() > 0.1


@pytest.mark.parametrize("name", ["msmoe", "average", "random_group", "hcsmoe"])
def test_merging_identical_experts_is_exact(name):
    g, u, d = expert()
    gate, up, down = (t.expand(4, *t.shape).clone() for t in (g, u, d))
    out = np.tile(np.arange(12.0), (4, 1))
    lay = layer(gate, up, down, keep=2, frequencies=[0.4, 0.3, 0.2, 0.1], output_mean=out)
    plan = METHODS.get(name)(lay, METHODS.get(name).params())
    for i in range(2):
        merged = plan.expert(i)
        torch.testing.assert_close(merged[0], g, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged[2], d, rtol=0, atol=1e-6)


def test_one_hot_frequencies_make_the_weighted_merge_a_selection():
    stack = torch.randn(3, 5, 4)
    assert torch.equal(weighted_merge(stack, [0.0, 1.0, 0.0]), stack[1])
    assert torch.allclose(weighted_merge(stack, [0.0, 0.0, 0.0]), stack.mean(0))  # no tokens at all: uniform
    gate, up, down = (torch.randn(3, 6, 4), torch.randn(3, 6, 4), torch.randn(3, 4, 6))
    lay = layer(gate, up, down, keep=1, frequencies=[0.0, 1.0, 0.0])
    plan = METHODS.get("msmoe")(lay, METHODS.get("msmoe").params(align=False))
    merged = plan.expert(0)
    assert torch.equal(merged[0], gate[1]) and torch.equal(merged[2], down[1])


def test_grouping_follows_router_logit_similarity():
    sim = np.array([[1, .1, .9, .2], [.1, 1, .3, .8], [.9, .3, 1, .1], [.2, .8, .1, 1]])
    lay = layer(*(torch.randn(4, 6, 4), torch.randn(4, 6, 4), torch.randn(4, 4, 6)), keep=2,
                frequencies=[0.1, 0.2, 0.3, 0.4], similarity=sim)
    # dominant: 3 and 2 (most frequent); 0 resembles 2, 1 resembles 3
    assert dominant_groups(lay) == [[3, 1], [2, 0]]


def test_hcsmoe_clusters_experts_by_output():
    out = np.array([[0.0, 0.0], [10.0, 10.0], [0.1, 0.0], [10.0, 10.2], [0.0, 0.2]])
    lay = layer(torch.randn(5, 6, 4), torch.randn(5, 6, 4), torch.randn(5, 4, 6), keep=2,
                frequencies=[0.1, 0.3, 0.2, 0.2, 0.2], output_mean=out)
    plan = METHODS.get("hcsmoe")(lay, METHODS.get("hcsmoe").params())
    assert sorted(sorted(g) for g in plan.groups) == [[0, 2, 4], [1, 3]]
    assert [g[0] for g in plan.groups] == [2, 1]  # each cluster's most frequent member anchors it


@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_every_method_keeps_what_it_is_asked_and_is_the_identity_at_full_size(name):
    gate, up, down = torch.randn(4, 6, 4), torch.randn(4, 6, 4), torch.randn(4, 4, 6)
    extra = {"output_mean": np.random.default_rng(0).normal(size=(4, 3)), "reap": np.array([.3, .1, .4, .2])}
    freq = [0.1, 0.2, 0.3, 0.4]
    method = METHODS.get(name)
    plan = method(layer(gate, up, down, keep=2, frequencies=freq, **extra), method.params())
    g_, _, d_ = plan.stacked()
    assert len(plan.groups) == 2 and g_.shape == (2, 6, 4) and d_.shape == (2, 4, 6)
    full = method(layer(gate, up, down, keep=4, frequencies=freq, **extra), method.params())
    order = [g[0] for g in full.groups]
    assert sorted(order) == [0, 1, 2, 3]
    g_, _, d_ = full.stacked()
    assert torch.equal(g_, gate[order]) and torch.equal(d_, down[order])


def test_pruning_methods_keep_the_highest_scores():
    gate, up, down = torch.randn(4, 6, 4), torch.randn(4, 6, 4), torch.randn(4, 4, 6)
    lay = layer(gate, up, down, keep=2, frequencies=[0.4, 0.1, 0.3, 0.2], reap=np.array([0.1, 0.5, 0.2, 0.4]))
    freq = METHODS.get("prune_frequency")(lay, METHODS.get("prune_frequency").params())
    reap = METHODS.get("reap")(lay, METHODS.get("reap").params())
    assert freq.groups == [[0], [2]] and reap.groups == [[1], [3]] and reap.routing == "prune"
    assert torch.equal(reap.stacked()[1], up[[1, 3]])


def test_random_grouping_is_seeded():
    gate, up, down = torch.randn(6, 6, 4), torch.randn(6, 6, 4), torch.randn(6, 4, 6)
    method = METHODS.get("random_group")
    a = method(layer(gate, up, down, keep=3, seed=1), method.params()).groups
    b = method(layer(gate, up, down, keep=3, seed=1), method.params()).groups
    assert a == b and sorted(len(g) for g in a) == [2, 2, 2]


def test_adaptive_allocation_is_one_global_frequency_threshold():
    freq = np.array([[70, 10, 10, 10], [30, 30, 20, 20], [40, 40, 10, 10]])  # per-layer counts
    # shares: layer 0 (.7 .1 .1 .1), layer 1 (.3 .3 .2 .2), layer 2 (.4 .4 .1 .1); 7 experts, >= 1 each:
    # the layers' tops (.7, .3, .4) first, then .4 (l2), .3 (l1), .2, .2 (l1)
    assert allocate(freq, 7, min_experts=1) == [1, 4, 2]
    assert allocate(freq, 6, min_experts=2) == [2, 2, 2]
    assert allocate(freq, 6, mode="uniform") == [2, 2, 2]
    with pytest.raises(ConfigError, match="between 6 and 12"):
        allocate(freq, 5, min_experts=2)
    with pytest.raises(ConfigError, match="multiple of 3"):
        allocate(freq, 7, mode="uniform")


def test_low_rank_plus_sparse_known_answers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 8, generator=g)
    full = factorize(w, 8, 0)  # full rank: the SVD reproduces the matrix
    torch.testing.assert_close(full.dense(), w, rtol=0, atol=1e-5)
    all_columns = factorize(w, 2, 8)  # every residual column kept: exact whatever the rank
    torch.testing.assert_close(all_columns.dense(), w, rtol=0, atol=1e-5)
    low = torch.randn(12, 3, generator=g) @ torch.randn(3, 8, generator=g)
    torch.testing.assert_close(factorize(low, 3, 0).dense(), low, rtol=0, atol=1e-5)  # a rank-3 matrix at rank 3
    scaled = w * torch.tensor([1.0, 9, 1, 1, 1, 7, 1, 1])  # columns 1 and 5 carry the most energy
    f = factorize(scaled, 0, 2)  # no low rank: the residual is the matrix, its two largest columns stay
    assert f.index.tolist() == [1, 5] and torch.equal(f.values, scaled[:, [1, 5]])
    f = factorize(scaled, 3, 2)
    x = torch.randn(4, 8, generator=g)
    torch.testing.assert_close(f.apply(x), x @ f.dense().T, rtol=1e-5, atol=1e-5)
    r, k = split_budget(1536, 576, 0.4, 0.2)
    assert r * (1536 + 576) + k * 1536 <= 0.4 * 1536 * 576 and k == int(0.2 * 0.4 * 1536 * 576 // 1536)
    with pytest.raises(ConfigError):
        split_budget(4, 4, 0.0, 0.2)


class CountingSource:
    """An expert source that hands out fresh copies and records how many expert matrices were alive at once."""

    def __init__(self, gate, up, down):
        self.stacks = StackedExperts(gate, up, down)
        self.num_experts = self.stacks.num_experts
        self.live = 0
        self.peak = 0

    def _track(self, t):
        t = t.clone()
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._freed)
        return t

    def _freed(self):
        self.live -= 1

    def part(self, e, part):
        return self._track(self.stacks.part(e, part))

    def expert(self, e):
        return tuple(self._track(t) for t in self.stacks.expert(e))


@pytest.mark.parametrize("align", [True, False])
def test_the_streamed_merge_equals_the_stacked_formula_holding_one_expert_at_a_time(align):
    g = torch.Generator().manual_seed(3)
    gate, up, down = torch.randn(6, 20, 8, generator=g), torch.randn(6, 20, 8, generator=g), torch.randn(6, 8, 20, generator=g)
    source = CountingSource(gate, up, down)
    members, freq = [2, 0, 5, 1], np.array([0.4, 0.1, 0.3, 0.2])
    got = merged_expert(source, members, merge_weights(freq), align=align)
    # the same merge written directly: align each member onto the anchor, stack, weighted average
    aligned = []
    for e in members:
        ge, ue, de = gate[e], up[e], down[e]
        if align and e != members[0]:
            p = align_to(gate[members[0]], up[members[0]], down[members[0]], ge, ue, de)
            ge, ue, de = ge[p], ue[p], de[:, p]
        aligned.append((ge, ue, de))
    for i in range(3):
        torch.testing.assert_close(got[i], weighted_merge(torch.stack([a[i] for a in aligned]), freq),
                                   rtol=1e-6, atol=1e-6)
    # never the group at once (the stacked merge held 3 x 4 matrices): with alignment the anchor's three
    # matrices and one member matrix, without it one member matrix
    assert source.peak == (4 if align else 1)

