"""The blockwise evaluation behind linear and TIES: exact thresholds, results independent of blocks."""

from __future__ import annotations

import pytest
import torch

import expertkit.merge.methods.blockwise as bw
from expertkit.merge import merge_state_dicts
from expertkit.merge.core import get_method, merge_tensor
from expertkit.merge.methods.base import elect_and_mean, weighted_sum


@pytest.mark.parametrize("kind", ["normal", "ties", "sparse"])
@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.97])
def test_threshold_is_exactly_the_kth_largest_magnitude(kind, density):
    g = torch.Generator().manual_seed(3)
    n = 300_001
    base = torch.randn(n, generator=g)
    noise = {"normal": torch.randn(n, generator=g),
             "ties": torch.randint(-2, 3, (n,), generator=g).float(),  # |d| in {0, 1, 2}: huge ties
             "sparse": torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.1)}[kind]
    model = base + noise
    k = max(1, int(density * n))
    mag = (model - base).abs()
    expect = torch.kthvalue(mag, n - k + 1).values
    thr, l1, l1_kept = bw.kth_largest_magnitude(model, base, k, torch.float32)
    assert thr == float(expect)
    assert l1 == pytest.approx(float(mag.double().sum()), rel=1e-9)
    assert l1_kept == pytest.approx(float(mag[mag >= expect].double().sum()), rel=1e-9)


def test_a_missed_bracket_falls_back_to_a_full_selection(monkeypatch):
    monkeypatch.setattr(bw, "SAMPLE", 3)  # a 3-element sample brackets nothing reliably
    g = torch.Generator().manual_seed(0)
    base, model = torch.zeros(50_000), torch.randn(50_000, generator=g)
    for k in (1, 17, 25_000, 49_999):
        thr, _, _ = bw.kth_largest_magnitude(model, base, k, torch.float32)
        assert thr == float(torch.kthvalue(model.abs(), 50_000 - k + 1).values), k


@pytest.mark.parametrize(("method", "params"), [("linear", {}), ("ties", {"density": 0.3}),
                                                ("ties", {"density": 0.6, "rescale": True})])
def test_results_do_not_depend_on_the_block_size(monkeypatch, method, params):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(301, 77, generator=g).to(torch.bfloat16)}
    models = [{"w": (base["w"].float() + torch.randn(301, 77, generator=g)).to(torch.bfloat16)} for _ in range(3)]
    ref = merge_state_dicts(method, models, base, weights=[0.5, 1.0, 0.25], params=params)["w"]
    monkeypatch.setattr(bw, "BLOCK", 1000)  # 24 uneven blocks instead of one
    got = merge_state_dicts(method, models, base, weights=[0.5, 1.0, 0.25], params=params)["w"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


def _whole_ties(models, base, weights, densities, rescale, normalize, lam, dtype):
    """TIES over whole tensors, as before the blockwise rewrite: ``torch.kthvalue`` over each whole
    task vector, L1 sums in float64 (the blockwise code's precision), one election over everything."""
    b = base.float()
    deltas = []
    for m, density in zip(models, densities, strict=True):
        d = m.float() - b
        if density <= 0:
            d.zero_()
        elif density < 1:
            mag = d.abs().reshape(-1)
            n = mag.numel()
            thr = torch.kthvalue(mag, n - max(1, int(density * n)) + 1).values
            l1 = float(mag.double().sum())
            d.masked_fill_(d.abs() < thr, 0)
            kept = float(d.abs().double().sum())
            if rescale and kept > 0:
                d.mul_(l1 / kept)
        deltas.append(d)
    return elect_and_mean(deltas, weights, normalize).mul_(lam).add_(b).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("block", [None, 4099])
def test_blockwise_ties_and_linear_equal_the_whole_tensor_merges(monkeypatch, dtype, threads, block):
    """Bit for bit, on tensors of several blocks (the default 2^17 and an odd size), on one thread
    and on a pool, with per-model densities including 'keep all' and rescaling."""
    g = torch.Generator().manual_seed(5)
    shape = (613, 509)  # 312,017 elements: 3 default blocks, 77 odd ones
    base = torch.randn(shape, generator=g).to(dtype)
    models = [(base.float() + torch.randn(shape, generator=g) * s).to(dtype) for s in (1.0, 0.3, 2.0)]
    weights = [0.7, -0.2, 1.3]
    if block is not None:
        monkeypatch.setattr(bw, "BLOCK", block)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rescale, normalize, lam in ((False, True, 1.0), (True, False, 0.8)):
            densities = [0.3, 1.0, 0.05]
            method = get_method("ties")
            params = method.params.model_validate({"rescale": rescale, "normalize": normalize, "lambda": lam})
            per_model = [params.model_copy(update={"density": d}) for d in densities]
            got = merge_tensor(method, "w", models, base, weights=weights, params=params, per_model=per_model)
            ref = _whole_ties(models, base, weights, densities, rescale, normalize, lam, dtype)
            assert got.dtype == dtype and torch.equal(got, ref), (rescale, normalize)
        got = merge_state_dicts("linear", [{"w": m} for m in models], weights=weights)["w"]
        ref = weighted_sum([m.float() for m in models], weights, True, torch.float32).to(dtype)
        assert torch.equal(got, ref)
    finally:
        torch.set_num_threads(old_threads)
