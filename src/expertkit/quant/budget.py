"""The bit-budget solver: the bits of every matrix so that the average hits a target exactly.

What is counted (:meth:`expertkit.quant.grid.Scheme.storage_bits`): every stored bit of the quantized
matrices: ``b`` bits per code, plus per group a scale (16 bits for float16 scales) and, when
asymmetric, a ``b``-bit zero-point; a matrix kept in 16-bit costs 16 bits per weight. The average
is over the weights of the matrices the policy covers (embeddings, norms and routers are not
quantized and not counted; :func:`model_bits` gives the whole model's bits per parameter too).

The problem (a multiple-choice knapsack): each unit ``u`` (``n_u`` weights, priority ``p_u``) takes one
of the allowed bit widths ``b``; minimise the priority-weighted quantization noise
``sum_u p_u n_u 4^(-b_u)`` (uniform-grid noise power falls by 4 per bit) subject to
``sum_u bits_u(b_u) <= target * sum_u n_u``. It is solved exactly as a mixed-integer program by HiGHS
(``scipy.optimize.milp``) with the stored bits *equal* to the budget (the target times the weights,
rounded down to the finest step the costs allow), so the target is hit exactly whenever some
assignment can hit it; only when none can, the best assignment below the budget is taken and every
upgrade that still fits added, so that no single unit could be given more bits without exceeding it. A target below the cheapest or above the dearest assignment is an error saying which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from expertkit.errors import ConfigError
from expertkit.quant.grid import KEEP_BITS, Scheme, check_bits


@dataclass(frozen=True)
class Unit:
    """One matrix the solver assigns bits to."""

    name: str
    rows: int
    cols: int
    priority: float = 1.0


@dataclass(frozen=True)
class Format:
    """How every unit is stored apart from its bit width."""

    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "float16"
    clip_grid: int = 0  # the scales' clipping search (Scheme.clip_grid); stored bits do not depend on it

    def scheme(self, bits: int, cols: int) -> Scheme:
        """The scheme of a ``bits``-bit matrix with ``cols`` input columns (per channel when the group
        size does not divide ``cols``)."""
        group = self.group_size if self.group_size == -1 or cols % self.group_size == 0 else -1
        return Scheme(bits, group, self.symmetric, self.scale_dtype, self.clip_grid)

    def bits(self, unit: Unit, bits: int) -> int:
        """Stored bits of ``unit`` at ``bits``."""
        return self.scheme(bits, unit.cols).storage_bits(unit.rows, unit.cols)


@dataclass
class Allocation:
    """Bits per unit and what they add up to."""

    bits: dict[str, int]
    target: float | None
    achieved: float  # stored bits per weight, scales and zero-points included
    code_bits: float  # bits per weight of the codes alone
    total_bits: int
    weights: int
    per_width: dict[int, int]  # bit width -> weights stored at it

    def summary(self) -> dict[str, object]:
        """JSON-able headline: target, achieved, and how many weights got each width."""
        return {"target_bits": self.target, "achieved_bits": self.achieved, "code_bits": self.code_bits,
                "total_bits": self.total_bits, "weights": self.weights,
                "weights_per_width": {str(b): n for b, n in sorted(self.per_width.items())}}


def allocation(units: Sequence[Unit], bits: dict[str, int], fmt: Format, target: float | None = None) -> Allocation:
    """The :class:`Allocation` of a given assignment ``{unit name: bits}``."""
    total = sum(fmt.bits(u, bits[u.name]) for u in units)
    weights = sum(u.rows * u.cols for u in units)
    codes = sum(u.rows * u.cols * bits[u.name] for u in units)
    per: dict[int, int] = {}
    for u in units:
        per[bits[u.name]] = per.get(bits[u.name], 0) + u.rows * u.cols
    return Allocation(dict(bits), target, total / weights, codes / weights, total, weights, per)


def check_choices(choices: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct bit widths, each 2..8 or 16."""
    if not choices:
        raise ConfigError("choices: give at least one bit width.")
    return tuple(sorted({check_bits(b, "choices") for b in choices}))


def solve_budget(units: Sequence[Unit], choices: Sequence[int], target: float, fmt: Format, *,
                 time_limit: float = 120.0) -> Allocation:
    """Bits for every unit so that the stored average is at most ``target`` and as close as it can get."""
    choices = check_choices(choices)
    if not units:
        raise ConfigError("the budget solver got no matrices to assign bits to.")
    if any(u.priority <= 0 for u in units):
        raise ConfigError("unit priorities must be positive.")
    weights = sum(u.rows * u.cols for u in units)
    budget = int(np.floor(target * weights + 1e-9))
    cost = np.array([[fmt.bits(u, b) for b in choices] for u in units], dtype=np.float64)  # (U, K)
    low, high = cost.min(1).sum(), cost.max(1).sum()
    if low > budget:
        raise ConfigError(f"the policy cannot meet a budget of {target} bits per weight: its choices "
                          f"{list(choices)} need at least {low / weights:.4f} (scales and zero-points counted). "
                          "Raise target_bits, add a smaller bit width, or use larger groups.")
    if high < budget:
        raise ConfigError(f"a budget of {target} bits per weight is more than the choices {list(choices)} can use "
                          f"(at most {high / weights:.4f}); lower target_bits or add a larger bit width.")
    noise = np.array([[u.rows * u.cols * u.priority * (0.0 if b == KEEP_BITS else 4.0 ** -b) for b in choices]
                      for u in units])  # (U, K)
    noise = noise / (noise.max() or 1.0)  # all zero when every choice keeps 16 bits
    res = _milp(cost, noise, budget, exact=True, time_limit=time_limit, node_limit=EXACT_NODES)
    if res.x is None:  # no assignment lands on the budget exactly (or none was found quickly): the best below it
        res = _milp(cost, noise, budget, exact=False, time_limit=time_limit)
    if res.x is None:
        raise ConfigError(f"the budget solver found no assignment ({res.message}).")
    pick = res.x.reshape(cost.shape).argmax(1)
    pick = _repair(pick, cost, noise, budget)
    bits = {u.name: choices[k] for u, k in zip(units, pick, strict=True)}
    return allocation(units, bits, fmt, target)


#: branch-and-bound nodes the exact search may use: a deterministic bound (a time limit would make
#: the result depend on the machine); proving that no assignment is exact can take minutes otherwise
EXACT_NODES = 200


def _milp(cost: np.ndarray, noise: np.ndarray, budget: int, *, exact: bool, time_limit: float,
          node_limit: int | None = None) -> Any:
    """One-hot choice per unit minimising ``noise`` with stored bits ``== budget`` (``exact``) or ``<= budget``.

    Costs are divided by their greatest common divisor so that the budget row has small integer
    coefficients, which the solver's feasibility tolerance cannot blur; the exact row's right-hand side
    is the budget rounded down to that unit (the most bits any assignment can store within it).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_u, n_k = cost.shape
    step = int(np.gcd.reduce(cost.astype(np.int64).ravel()))
    row = (cost / step).reshape(1, -1)  # integer coefficients
    cap = budget // step
    one = np.zeros((n_u, n_u * n_k))
    for i in range(n_u):
        one[i, i * n_k:(i + 1) * n_k] = 1.0
    constraints = [LinearConstraint(one, 1.0, 1.0), LinearConstraint(row, cap if exact else -np.inf, cap)]
    return milp(noise.ravel(), constraints=constraints, integrality=np.ones(n_u * n_k), bounds=Bounds(0, 1),
                options={"time_limit": time_limit, "mip_rel_gap": 1e-9,
                         **({"node_limit": node_limit} if node_limit else {})})


def _repair(pick: np.ndarray, cost: np.ndarray, noise: np.ndarray, budget: int) -> np.ndarray:
    """Exact integer bookkeeping after the float solve: downgrade while over the budget (solver
    tolerance), then take every upgrade that still fits, best noise reduction per bit first."""
    pick = pick.copy()
    total = int(cost[np.arange(len(pick)), pick].sum())
    while total > budget:
        cand = [(noise[i, pick[i] - 1] - noise[i, pick[i]], i) for i in range(len(pick)) if pick[i] > 0]
        _, i = min(cand)
        total -= int(cost[i, pick[i]] - cost[i, pick[i] - 1])
        pick[i] -= 1
    improved = True
    while improved:
        improved = False
        order = sorted((i for i in range(len(pick)) if pick[i] + 1 < cost.shape[1]),
                       key=lambda i: -(noise[i, pick[i]] - noise[i, pick[i] + 1]) / (cost[i, pick[i] + 1] - cost[i, pick[i]]))
        for i in order:
            step = int(cost[i, pick[i] + 1] - cost[i, pick[i]])
            if total + step <= budget:
                pick[i] += 1
                total += step
                improved = True
    return pick


def model_bits(allocation_: Allocation, other_params: int, other_bits: int = 16) -> float:
    """Bits per parameter of the whole model: the quantized matrices plus every other parameter
    (embeddings, norms, routers) stored at ``other_bits``."""
    return (allocation_.total_bits + other_params * other_bits) / (allocation_.weights + other_params)
