"""Paired comparisons: exact McNemar, paired bootstrap, sample size, verdicts; known answers."""

from __future__ import annotations

import math

import pytest

from expertkit.errors import ConfigError
from expertkit.tasks.paired import (
    compare,
    compare_continuous,
    gap_closed,
    mcnemar,
    mcnemar_sample_size,
    paired_bootstrap,
    verdict,
)


def test_mcnemar_counts_discordant_pairs_and_matches_the_binomial_by_hand():
    a = [1, 1, 1, 1, 1, 0, 0, 1, 0, 1]
    b = [0, 0, 0, 0, 1, 0, 1, 1, 0, 0]
    a_only, b_only, p = mcnemar(a, b)
    assert (a_only, b_only) == (5, 1)
    # exact two-sided binomial on 6 discordant pairs, 5 for A: 2 * P(X >= 5 | n=6, 1/2) = 2 * 7 / 64
    assert p == pytest.approx(2 * (math.comb(6, 5) + math.comb(6, 6)) / 2**6)


def test_no_discordant_pairs_gives_p_one_and_a_zero_interval():
    res = compare([1, 0, 1], [1, 0, 1])
    assert res.p_value == 1.0 and res.diff == 0.0 and (res.diff_low, res.diff_high) == (0.0, 0.0)


def test_bootstrap_interval_contains_the_difference_and_is_seeded():
    a = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 10
    b = [0, 0, 1, 0, 0, 1, 0, 1, 0, 1] * 10
    lo, hi = paired_bootstrap(a, b, seed=3)
    assert lo < 0.3 < hi and (lo, hi) == paired_bootstrap(a, b, seed=3)
    assert 0.15 < lo and hi < 0.45


def test_sample_size_formula_by_hand():
    # delta 0.05 with 20% discordant pairs, alpha 0.05, power 0.8
    za, zb = 1.959963984540054, 0.8416212335729143
    expected = math.ceil((za * math.sqrt(0.2) + zb * math.sqrt(0.2 - 0.05**2)) ** 2 / 0.05**2)
    assert mcnemar_sample_size(0.05, 0.2) == expected == 626  # (0.8765 + 0.3740)^2 / 0.0025 = 625.6
    with pytest.raises(ConfigError, match="discordant"):
        mcnemar_sample_size(0.3, 0.2)


def test_verdicts_say_supported_contradicted_or_not_shown():
    better = compare([1] * 40 + [0] * 10, [0] * 40 + [0] * 10)
    assert "supported" in verdict("A beats B", better)
    assert "contradicted" in verdict("B beats A", compare([0] * 50, [1] * 40 + [0] * 10))
    assert "not shown" in verdict("A beats B", compare([1, 0, 1, 0], [0, 1, 1, 0]))


def test_unequal_lengths_are_refused():
    with pytest.raises(ConfigError, match="equally long"):
        compare([1, 0], [1])


def test_continuous_comparison_uses_the_signed_rank_test():
    from scipy.stats import wilcoxon

    a = [0.1 * i for i in range(20)]
    b = [0.1 * i - (0.05 if i % 3 else -0.02) for i in range(20)]
    res = compare_continuous(a, b)
    assert res.p_value == pytest.approx(wilcoxon(a, b).pvalue)
    assert (res.a_only, res.b_only) == (13, 7) and res.diff_low <= res.diff <= res.diff_high


def test_gap_closed_by_hand_and_its_interval_is_paired_and_seeded():
    import numpy as np

    rng = np.random.default_rng(0)
    ref = rng.normal(3.0, 0.5, 200)  # per-block NLLs
    base = ref + 0.4 + rng.normal(0, 0.05, 200)
    mid = ref + 0.2 + rng.normal(0, 0.05, 200)
    f, b, m = (math.exp(x.mean()) for x in (ref, base, mid))
    share, lo, hi = gap_closed(ref, base, mid, seed=1)
    assert share == pytest.approx((b - m) / (b - f)) and 0.4 < share < 0.6
    assert lo < share < hi and hi - lo < 0.1  # pairing removes the blocks' own spread (sd 0.5)
    assert (share, lo, hi) == gap_closed(ref, base, mid, seed=1)
    assert gap_closed(ref, base, base)[0] == 0.0 and gap_closed(ref, base, ref)[0] == pytest.approx(1.0)
    worse, _, w_hi = gap_closed(ref, base, base + 0.1)
    assert worse < 0 and w_hi < 0


def test_gap_closed_refuses_no_gap_and_mismatched_lengths():
    with pytest.raises(ConfigError, match="no gap"):
        gap_closed([1.0, 2.0], [1.0, 2.0], [1.5, 2.5])
    with pytest.raises(ConfigError, match="one length"):
        gap_closed([1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0])
