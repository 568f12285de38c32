"""Small statistics for evaluation results.

The accuracy of ``n`` scored examples is reported with a Wilson score interval,
which (unlike the normal approximation) stays inside [0, 1] and is sensible at
0 % and 100 % accuracy and for small ``n``::

    centre = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

with ``p`` the observed accuracy and ``z`` the normal quantile of the level
(1.959964 for 95 %).
"""

from __future__ import annotations

import math
from statistics import NormalDist

from expertkit.errors import ConfigError

#: z for a two-sided 95 % interval.
Z95 = 1.959963984540054


def z_value(level: float) -> float:
    """The two-sided normal quantile for a confidence ``level`` in (0, 1)."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must be in (0, 1), got {level}.")
    if abs(level - 0.95) < 1e-12:
        return Z95
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` at confidence ``level``.

    ``successes`` may be fractional (a sum of scores in [0, 1]). With ``n == 0``
    nothing is known and the interval is ``(0.0, 1.0)``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ConfigError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}.")
    if n == 0:
        return 0.0, 1.0
    z = z_value(level)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no rounding residue
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi
