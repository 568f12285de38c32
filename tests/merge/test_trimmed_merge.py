"""TIES in one pass (``blockwise.trimmed_merge``): the same bits as whole-tensor TIES on every path
(fix-up near the thresholds, heavily tied bfloat16 task vectors, wide brackets, missed brackets),
and every input read once on the one-pass paths. Also the vectorised helpers it rests on."""

from __future__ import annotations

import math

import pytest
import torch

import expertkit.merge.methods.blockwise as bw
from expertkit.merge.core import get_method, merge_tensor
from expertkit.merge.methods.base import elect_and_mean

from test_blockwise import _whole_ties


def _zoo(kind: str, shape=(211, 157)):
    g = torch.Generator().manual_seed(11)
    if kind == "continuous":  # float32 task vectors: no ties
        base = torch.randn(shape, generator=g)
        return base, [base + torch.randn(shape, generator=g) * s for s in (1.0, 0.3, 2.0)]
    # bfloat16 weights plus noise below their resolution: |d| takes a few values, each tied many times
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    return base, [(base.float() + torch.randn(shape, generator=g) * 2e-4).to(torch.bfloat16) for _ in range(3)]


def _ties(models, base, weights, densities, normalize=True, lam=1.0):
    method = get_method("ties")
    params = method.params.model_validate({"normalize": normalize, "lambda": lam})
    per_model = [params.model_copy(update={"density": d}) for d in densities]
    return merge_tensor(method, "w", models, base, weights=weights, params=params, per_model=per_model)


def _passes(monkeypatch) -> list[str]:
    """Record the name of every block-wise pass (``map_blocks`` callback)."""
    seen: list[str] = []
    real = bw.map_blocks

    def spy(n, fn):
        seen.append(getattr(fn, "__name__", "?"))
        return real(n, fn)

    monkeypatch.setattr(bw, "map_blocks", spy)
    return seen


@pytest.mark.parametrize(("kind", "densities", "expect"), [
    ("continuous", [0.3, 1.0, 0.05], ["one_pass", "fix"]),
    ("tied", [0.2, 1.0, 0.2], ["one_pass"]),
])
def test_one_pass_equals_whole_tensor_ties_and_reads_the_inputs_once(monkeypatch, kind, densities, expect):
    base, models = _zoo(kind)
    weights = [0.7, -0.2, 1.3]
    for normalize, lam in ((True, 1.0), (False, 0.8)):
        monkeypatch.setattr(bw, "BLOCK", 2053)  # 17 uneven blocks
        monkeypatch.setattr(bw, "SAMPLE", 4096)  # 33,127 elements: a strided sample
        passes = _passes(monkeypatch)
        got = _ties(models, base, weights, densities, normalize, lam)
        ref = _whole_ties(models, base, weights, densities, False, normalize, lam, base.dtype)
        assert torch.equal(got, ref), (kind, normalize)
        # one pass over the inputs; for continuous values a fix-up of the few elements near a threshold,
        # for tied bfloat16 values none (the threshold is the bracket's top, tied many times)
        assert passes == expect
        monkeypatch.undo()


@pytest.mark.parametrize("fallback", ["wide bracket", "missed bracket", "full band store"])
def test_fallbacks_merge_again_with_the_same_bits(monkeypatch, fallback):
    base, models = _zoo("continuous")
    weights, densities = [1.0, 0.5, 2.0], [0.2, 0.6, 0.01]
    if fallback == "wide bracket":
        monkeypatch.setattr(bw, "MAX_BAND", 0.0)
    elif fallback == "full band store":  # more elements in a bracket than the sample promised
        monkeypatch.setattr(bw._Band, "for_bracket", classmethod(lambda cls, n, f, dtype: cls(3, dtype)))
    else:  # a sample that misled: brackets far above every threshold, holding nothing
        real = bw._brackets
        monkeypatch.setattr(bw, "_brackets", lambda *a: [(hi * 10 + 1, hi * 20 + 2, 0.0) for _, hi, _ in real(*a)])
    passes = _passes(monkeypatch)
    got = _ties(models, base, weights, densities)
    assert torch.equal(got, _whole_ties(models, base, weights, densities, False, True, 1.0, base.dtype))
    assert passes[-2:] == ["count", "exact"]  # thresholds first, then every block merged with them
    assert (passes[0] == "one_pass") == (fallback != "wide bracket")


def test_nan_is_kept_and_not_counted_on_every_path(monkeypatch):
    base, models = _zoo("continuous", (97, 89))
    models[0].view(-1)[::37] = math.nan
    weights, densities = [1.0, 1.0, 1.0], [0.3, 0.3, 0.3]
    one = _ties(models, base, weights, densities)
    monkeypatch.setattr(bw, "MAX_BAND", 0.0)
    two = _ties(models, base, weights, densities)
    assert torch.equal(one.isnan(), two.isnan()) and torch.equal(one.nan_to_num(), two.nan_to_num())
    assert bool(one.view(-1)[::37].isnan().all())
    finite = models[0].view(-1)[~models[0].view(-1).isnan()] - base.view(-1)[~models[0].view(-1).isnan()]
    k = max(1, int(0.3 * base.numel()))  # NaN not counted: the k-th largest of the finite magnitudes
    thr, _, _ = bw.kth_largest_magnitude(models[0].view(-1), base.view(-1), k, torch.float32)
    assert thr == float(torch.kthvalue(finite.abs(), finite.numel() - k + 1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trim_is_masked_fill_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(2)
    d = torch.randn(5000, generator=g).to(dtype)
    d[:6] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 0.5], dtype=dtype)
    d[6:9] = torch.tensor([-0.5, float(torch.nextafter(torch.tensor(0.5, dtype=dtype),
                                                       torch.tensor(0.0, dtype=dtype))), 1.0], dtype=dtype)
    for thr in (None, 0.0, 0.5, float(d[100].abs()), 2.0, math.inf):
        got = bw.trim(d.clone(), thr)
        ref = d.clone() if thr is None else d.masked_fill(d.abs() < thr, 0)
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num()), thr
        assert torch.equal(torch.signbit(got), torch.signbit(ref)), thr


@pytest.mark.parametrize(("lo", "hi"), [(0.5, 1.0), (0.0, 1.0), (-math.inf, 0.0), (1.5, math.inf), (1.0, 1.0)])
def test_tally_counts_like_comparisons(lo, hi):
    g = torch.Generator().manual_seed(4)
    d = torch.randint(-3, 4, (3000,), generator=g).float() / 2  # magnitudes 0, 0.5, ..., 1.5: many ties
    d[:4] = torch.tensor([math.inf, -math.inf, 1e-30, -1.0])
    for with_nan in (False, True):
        if with_nan:
            d[10] = math.nan
        kept, over, at_hi, mags, pos = bw._tally(d, lo, hi)
        mag = d.abs()
        assert over == int((mag > hi).sum()) and at_hi == int((mag == hi).sum())
        inside = ((mag >= lo) & (mag < hi)).nonzero().view(-1)
        assert torch.equal(pos, inside) and torch.equal(mags, mag[inside])
        assert torch.equal(kept.nan_to_num(), d.masked_fill(mag < hi, 0).nan_to_num())


def _elect_reference(deltas, weights, normalize, votes=None):
    """elect_and_mean as written before it was vectorised (bool masks, masked_fill)."""
    sign = torch.zeros_like(deltas[0])
    for d, v in zip(deltas, weights if votes is None else votes, strict=True):
        sign.add_(d, alpha=v)
    sign.ge_(0).mul_(2).sub_(1)
    acc, divisor = torch.zeros_like(sign), torch.zeros_like(sign)
    for d, w in zip(deltas, weights, strict=True):
        if w == 0:
            continue
        d.mul_(sign)
        if w < 0:
            d.neg_()
        d.clamp_(min=0)
        acc.add_(d, alpha=abs(w))
        divisor.add_(d > 0, alpha=w)
    if normalize:
        acc.div_(divisor.masked_fill_(divisor == 0, 1))
    return acc.mul_(sign)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 0.0, 1.7], [0.7, -0.2, 1.3], [1.0, 2.5, 0.1]])
@pytest.mark.parametrize("normalize", [True, False])
def test_elect_and_mean_unchanged_bit_for_bit(weights, normalize):
    g = torch.Generator().manual_seed(9)
    deltas = [torch.randn(4001, generator=g) * (torch.rand(4001, generator=g) < 0.5) for _ in range(3)]
    deltas[1][:50] = -deltas[0][:50]  # sums of exactly 0
    for votes in (None, [1.0, 1.0, 1.0]):
        got = elect_and_mean([d.clone() for d in deltas], weights, normalize, votes)
        assert torch.equal(got, _elect_reference([d.clone() for d in deltas], weights, normalize, votes))
