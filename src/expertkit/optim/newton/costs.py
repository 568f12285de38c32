"""Cost models of one linear solve ``A x = b`` (A: N x N, symmetric positive definite).

Nothing here runs a quantum computer: the quantum solver is a **cost model**. Q-Newton's
scheduler compares these predictions; every solve is then carried out classically.

Classical (seconds = flops / ``flop_rate``, or measured wall time, see the scheduler):

* Cholesky: ``N^3/3`` (factor) + ``2 N^2`` (two triangular solves).
* Conjugate gradients: ``k = ceil(sqrt(κ)/2 * ln(2/ε))`` iterations (the textbook bound
  ``‖e_k‖_A <= 2 ((√κ-1)/(√κ+1))^k ‖e_0‖_A``), each one matrix-vector product (``2 nnz`` flops,
  or its measured time for a matrix-free operator) plus ``10 N`` flops of vector updates.

Quantum linear-system solvers (QLSAs), in queries to a block encoding of ``A/α``. For a
d-sparse matrix reached through sparse-access oracles, ``α = d max|A_ij| / ‖A‖`` (between
1 and d), so the encoded matrix has condition number ``α κ``:

* ``qnewton`` -- the closed form the Q-Newton authors evaluate (their released code; the
  expression is Jennings et al., arXiv:2305.11352, for the randomised adiabatic solver with
  filtering)::

      Q = α / (0.39 - 0.204 ε) * [ (1741 α e / 500) sqrt(κ²+1) ((133/125 + 4/(25 κ^(1/3))) π ln(2κ+3) + 1)
                                   + (351/50) ln²(2κ+3) (ln(451 ln²(2κ+3) / ε) + 1) + α κ ln(32/ε) ]

* ``costa`` -- the optimal ``O(κ log 1/ε)`` solver of Costa et al. (PRX Quantum 3, 040303,
  2022; discrete adiabatic walk + eigenstate filtering). Our reading of its leading terms::

      Q = c_walk (α κ) + (α κ) ln(2/ε)

  with ``c_walk = 2305`` (their proven bound) or ``1.84`` (the constant Costa, An, Babbush and
  Berry measured on random matrices, arXiv:2312.07690, about 1,200 times smaller).

Time of one solve: ``Q * g(N) * t_gate`` with ``g(N) = ceil(log2 N)`` gates per query (the
oracle's address register; a deliberately cheap count that favours the quantum solver).
Options, because a QLSA returns a *state* ``|x⟩``, not the vector ``x``:

* state preparation of ``|b⟩``: ``2 N`` gates per run (generic amplitude encoding);
* readout by ℓ2 tomography: ``ceil(36 N ln N / δ²)`` runs of preparation + solve (Kerenidis
  & Prakash, 2020), for a solution with ℓ2 error δ.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from expertkit.errors import ConfigError

QUANTUM_MODELS = ("qnewton", "costa")
COSTA_WALK_BOUND = 2305.0  # Costa et al. 2022, proven upper bound
COSTA_WALK_MEASURED = 1.84  # Costa, An, Babbush, Berry 2023, measured on random matrices


def cholesky_flops(n: int) -> float:
    """Flops of a Cholesky factorisation plus the two triangular solves (``n^3/3 + 2 n^2``)."""
    return n**3 / 3.0 + 2.0 * n**2


def cg_iterations(kappa: float, eps: float, n: int | None = None) -> int:
    """CG iterations to reduce the A-norm error by ``eps``: ``ceil(sqrt(κ)/2 ln(2/ε))`` (at most n)."""
    k = max(1, math.ceil(0.5 * math.sqrt(max(kappa, 1.0)) * math.log(2.0 / eps)))
    return min(k, n) if n else k


def cg_flops(n: int, nnz: int, kappa: float, eps: float) -> float:
    """Flops of CG on an ``n x n`` matrix with ``nnz`` stored entries (exact arithmetic bound)."""
    return cg_iterations(kappa, eps, n) * (2.0 * nnz + 10.0 * n)


def jennings_queries(alpha: float, kappa: float, eps: float) -> float:
    """Block-encoding queries of the closed form evaluated by the Q-Newton authors (see module doc)."""
    k = max(kappa, 1.0)
    lg = math.log(2 * k + 3)
    walk = (1741 * alpha * math.e / 500) * math.sqrt(k**2 + 1) * ((133 / 125 + 4 / (25 * k ** (1 / 3))) * math.pi * lg + 1)
    filt = (351 / 50) * lg**2 * (math.log(451 * lg**2 / eps) + 1)
    tail = alpha * k * math.log(32 / eps)
    return alpha * (walk + filt + tail) / (0.39 - 0.204 * eps)


def costa_queries(alpha: float, kappa: float, eps: float, walk_constant: float = COSTA_WALK_BOUND) -> float:
    """Queries of the optimal discrete-adiabatic solver: ``c_walk ακ + ακ ln(2/ε)``."""
    ka = alpha * max(kappa, 1.0)
    return walk_constant * ka + ka * math.log(2.0 / eps)


def gates_per_query(n: int) -> int:
    """Gates charged per block-encoding query: ``ceil(log2 N)`` (at least 1)."""
    return max(1, math.ceil(math.log2(max(n, 2))))


def tomography_shots(n: int, delta: float) -> int:
    """Runs needed to read an n-dimensional state out to ℓ2 error ``delta``: ``36 N ln N / δ²``."""
    return max(1, math.ceil(36.0 * n * math.log(max(n, 2)) / delta**2))


@dataclass(frozen=True)
class QuantumCost:
    """Modelled seconds of one quantum linear solve, split into its parts."""

    queries: float
    solve_s: float  # queries * gates per query * gate time (one run, no preparation)
    prep_s: float  # state preparation of |b⟩, one run
    shots: int  # tomography runs for the readout
    total_s: float  # what the scheduler compares (per the options)
    with_readout_s: float  # preparation + solve, times the tomography runs (always reported)


def quantum_cost(
    n: int, kappa: float, d: int, alpha: float, *, eps: float, model: str = "qnewton",
    gate_time: float = 1e-6, walk_constant: float = COSTA_WALK_BOUND, state_prep: bool = False,
    readout: bool = False, readout_tol: float = 1e-2, query_s: float = 0.0,
) -> QuantumCost:
    """Modelled time of one QLSA solve of an ``n x n``, d-sparse system (see the module doc).

    ``alpha`` is the block-encoding subnormalisation ``d max|A_ij| / ‖A‖`` (1 <= α <= d).
    ``query_s``: seconds one oracle query costs on top of its gates, e.g. computing a row of a
    matrix-free operator (a GGN given only through products) for the sparse-access oracle.
    The solve itself is **not** run on a quantum computer; this only predicts its cost.
    """
    if model not in QUANTUM_MODELS:
        raise ConfigError(f"unknown quantum cost model '{model}'; choose one of {', '.join(QUANTUM_MODELS)}.")
    if not 0 < eps < 1:
        raise ConfigError(f"solver tolerance eps must be in (0, 1), got {eps}.")
    alpha = min(max(alpha, 1.0), max(d, 1))
    q = jennings_queries(alpha, kappa, eps) if model == "qnewton" else costa_queries(alpha, kappa, eps, walk_constant)
    if query_s < 0:
        raise ConfigError(f"the cost of an oracle query cannot be negative, got {query_s}.")
    solve = q * (gates_per_query(n) * gate_time + query_s)
    prep = 2.0 * n * gate_time
    run = solve + (prep if state_prep else 0.0)
    shots = tomography_shots(n, readout_tol)
    with_readout = shots * (solve + prep)
    return QuantumCost(q, solve, prep, shots, with_readout if readout else run, with_readout)


_RATE: dict[str, float] = {}


def measure_flop_rate(n: int = 384, repeats: int = 3) -> float:
    """This machine's float64 Cholesky rate in flop/s (best of ``repeats``; cached per process)."""
    if "rate" not in _RATE:
        gen = torch.Generator().manual_seed(0)
        m = torch.randn(n, n, generator=gen, dtype=torch.float64)
        a = m @ m.T + n * torch.eye(n, dtype=torch.float64)  # (n, n) SPD
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.linalg.cholesky(a)
            best = min(best, time.perf_counter() - t0)
        _RATE["rate"] = (n**3 / 3.0) / max(best, 1e-9)
    return _RATE["rate"]
