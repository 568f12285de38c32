"""Paired comparisons of two systems scored on the same examples, and the n a claim needs.

* :func:`mcnemar`: the exact McNemar test, i.e. a two-sided binomial test (``scipy.stats.binomtest``)
  on the discordant pairs (examples one system gets right and the other wrong); scores are read as
  correct when >= 0.5.
* :func:`compare_continuous`: the same for continuous paired values (Wilcoxon signed-rank test).
* :func:`paired_bootstrap`: a percentile bootstrap interval (``scipy.stats.bootstrap``, resampling
  examples, so the pairing is kept) of the difference of mean scores.
* :func:`gap_closed`: the share of a baseline's loss gap to a reference that a system closes, in
  perplexity, with a paired percentile bootstrap interval (``scipy.stats.bootstrap``, ``paired=True``).
* :func:`mcnemar_sample_size`: how many paired examples detect an accuracy difference ``delta``
  when a share ``discordant`` of pairs disagree (Connor 1987's normal approximation), so that an
  experiment can say why its n is large enough.
* :func:`verdict`: one line per claim from a test.

Nothing here is hand-written statistics beyond the sample-size formula: the tests are scipy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from expertkit.errors import ConfigError


@dataclass(frozen=True)
class PairedResult:
    """System A against system B on the same ``n`` examples."""

    n: int
    mean_a: float
    mean_b: float
    a_only: int  # examples only A gets right
    b_only: int  # examples only B gets right
    p_value: float  # exact McNemar, two-sided
    diff_low: float  # 95% paired bootstrap interval of mean_a - mean_b
    diff_high: float

    @property
    def diff(self) -> float:
        """``mean_a - mean_b``."""
        return self.mean_a - self.mean_b

    def as_dict(self) -> dict[str, float]:
        """JSON-able fields, the difference included."""
        return {"n": self.n, "mean_a": self.mean_a, "mean_b": self.mean_b, "diff": self.diff,
                "a_only": self.a_only, "b_only": self.b_only, "p_value": self.p_value,
                "diff_ci": [self.diff_low, self.diff_high]}


def _check(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ConfigError(f"paired scores need two equally long, non-empty lists; got {x.shape} and {y.shape}.")
    return x, y


def mcnemar(a: Sequence[float], b: Sequence[float]) -> tuple[int, int, float]:
    """``(A-only correct, B-only correct, exact two-sided p)`` for per-example scores of A and B."""
    from scipy.stats import binomtest

    x, y = _check(a, b)
    ca, cb = x >= 0.5, y >= 0.5
    a_only, b_only = int((ca & ~cb).sum()), int((cb & ~ca).sum())
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)
    return a_only, b_only, p


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 5000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a) - mean(b)`` over resampled examples."""
    from scipy.stats import bootstrap

    x, y = _check(a, b)
    if np.all(x - y == (x - y)[0]):
        return float((x - y)[0]), float((x - y)[0])  # every resample gives the same difference
    res = bootstrap((x - y,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def compare(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> PairedResult:
    """McNemar and the bootstrap interval of the difference, for A against B on the same examples."""
    x, y = _check(a, b)
    a_only, b_only, p = mcnemar(x, y)
    lo, hi = paired_bootstrap(x, y, seed=seed)
    return PairedResult(int(x.size), float(x.mean()), float(y.mean()), a_only, b_only, p, lo, hi)


def compare_continuous(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> PairedResult:
    """A against B on paired continuous values (e.g. per-block log-likelihoods): Wilcoxon signed-rank
    test (``scipy.stats.wilcoxon``) and the bootstrap interval of the mean difference; ``a_only`` /
    ``b_only`` count the pairs where A / B is larger."""
    from scipy.stats import wilcoxon

    x, y = _check(a, b)
    d = x - y
    p = 1.0 if np.all(d == 0) else float(wilcoxon(x, y).pvalue)
    lo, hi = paired_bootstrap(x, y, seed=seed)
    return PairedResult(int(x.size), float(x.mean()), float(y.mean()), int((d > 0).sum()), int((d < 0).sum()), p, lo, hi)


def gap_closed(reference: Sequence[float], baseline: Sequence[float], system: Sequence[float], *,
               resamples: int = 5000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Share of the perplexity gap ``ppl(baseline) - ppl(reference)`` that ``system`` closes, with a
    paired percentile bootstrap interval: ``(share, low, high)``.

    The three sequences are per-example mean NLLs on the same examples (e.g. test blocks);
    ``ppl = exp(mean NLL)``. 1 means the system reaches the reference, 0 the baseline, < 0 worse than
    the baseline. The examples are resampled together for the three systems.
    """
    from scipy.stats import bootstrap

    r = np.asarray(reference, dtype=np.float64)
    u = np.asarray(baseline, dtype=np.float64)
    m = np.asarray(system, dtype=np.float64)
    if not r.shape == u.shape == m.shape or r.ndim != 1 or r.size < 2:
        raise ConfigError(f"gap_closed needs three 1-D sequences of one length >= 2; got {r.shape}, {u.shape}, "
                          f"{m.shape}.")

    def share(r_: np.ndarray, u_: np.ndarray, m_: np.ndarray, axis: int = -1) -> np.ndarray:
        f, b, s = (np.exp(x.mean(axis=axis)) for x in (r_, u_, m_))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b != f, (b - s) / (b - f), np.nan)

    point = float(share(r, u, m))
    if not np.isfinite(point):
        raise ConfigError("gap_closed: the baseline's perplexity equals the reference's; there is no gap to close.")
    res = bootstrap((r, u, m), share, paired=True, vectorized=True, n_resamples=resamples, confidence_level=level,
                    method="percentile", random_state=np.random.default_rng(seed))
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def mcnemar_sample_size(delta: float, discordant: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Paired examples needed to detect an accuracy difference ``delta`` (Connor 1987).

    ``discordant`` is the expected share of pairs on which the systems disagree (it must be at
    least ``|delta|``): ``n = (z_a sqrt(d) + z_b sqrt(d - delta^2))^2 / delta^2``.
    """
    if not 0 < abs(delta) <= discordant <= 1:
        raise ConfigError(f"need 0 < |delta| <= discordant <= 1; got delta={delta}, discordant={discordant}.")
    za, zb = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    n = (za * math.sqrt(discordant) + zb * math.sqrt(discordant - delta**2)) ** 2 / delta**2
    return math.ceil(n)


def verdict(claim: str, result: PairedResult, *, alpha: float = 0.05, expect: str = "a>b",
            test: str = "exact McNemar") -> str:
    """One line: the claim, the difference with its interval and p, and whether it holds at ``alpha``."""
    holds = result.p_value < alpha and (result.diff > 0 if expect == "a>b" else result.diff < 0)
    against = result.p_value < alpha and not holds
    word = "supported" if holds else ("contradicted" if against else "not shown (difference within noise)")
    return (f"{claim}: {word}; difference {result.diff:+.3f} [{result.diff_low:+.3f}, {result.diff_high:+.3f}], "
            f"{test} p = {result.p_value:.2g} (n = {result.n}; {result.a_only} vs {result.b_only} discordant).")
