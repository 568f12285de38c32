"""Q-Newton's scheduler: for each linear solve, predict the cost of every solver and pick one.

Candidates: Cholesky (dense blocks), conjugate gradients, and a quantum linear-systems solver
whose cost is **modelled** (:mod:`expertkit.optim.newton.costs`). The quantum solve is never
run on quantum hardware: when the scheduler picks it, the sparsified system it would have been
given is solved classically (the "stand-in"), its wall time is recorded apart, and the
modelled quantum time is what the quantum column of the accounts is charged.

Classical predictions come from a flop model (``flops / flop_rate``) and from the measured wall
time of earlier solves of the same block (an exponential moving average); ``classical_cost``
says which one decides. Flop-based decisions are reproducible run to run; measured ones are not.

A matrix-free (Hessian-free) block is given only through operator products, each a pass through
the network. Its classical CG is charged one measured product per iteration, so the quantum side
is charged alike (``oracle_cost: row``, the default): each query of the sparse-access oracle
needs a row of the operator, one product ``A e_i``. With ``oracle_cost: gate`` a query costs its
gates only, the paper's assumption for a stored matrix; on matrix-free blocks that comparison is
lopsided (it made every LoRA solve "quantum" at a 1 as gate in docs/results.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg

from expertkit.optim.newton.costs import cg_flops, cg_iterations, cholesky_flops, quantum_cost

QUANTUM_NOTE = "modelled quantum cost; the solve ran classically"


@dataclass(frozen=True)
class System:
    """What the scheduler knows about one block's linear system before solving it."""

    block: str
    n: int
    dense: bool  # materialised matrix (Cholesky possible) or matrix-free operator
    kappa: float  # κ of the damped system the classical solvers get
    kappa_q: float  # κ of the (sparsified) system the quantum solver would get
    d: int  # row sparsity of that system (n for an operator: no entries to prune)
    alpha: float  # block-encoding subnormalisation d max|A_ij| / ‖A‖
    nnz: int  # stored entries of the classical system (n² dense)
    matvec_s: float | None = None  # measured seconds of one operator product (matrix-free blocks)


@dataclass
class Decision:
    """One scheduling decision, as logged (every field is a plain number or string)."""

    step: int
    block: str
    n: int
    kappa: float
    kappa_q: float
    d: int
    alpha: float
    predicted_s: dict[str, float]  # the numbers the choice compared
    flop_model_s: dict[str, float]  # classical solvers by the flop model
    measured_model_s: dict[str, float]  # classical solvers by earlier measured solves (when any)
    quantum_detail: dict[str, float]  # queries, solve, preparation, tomography shots, with readout
    chosen: str
    reason: str
    measured_s: float = 0.0  # wall time of the solve that actually ran (the stand-in for "quantum")
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (infinite κ written as a string)."""
        out = asdict(self)
        for k in ("kappa", "kappa_q"):
            if not math.isfinite(out[k]):
                out[k] = "inf"
        return out


class Scheduler:
    """Predicts solver costs per :class:`System` and picks the cheapest allowed one."""

    def __init__(self, hp: Any, *, quantum: bool, flop_rate: float) -> None:
        self.hp, self.quantum, self.flop_rate = hp, quantum, flop_rate
        self.measured: dict[str, float] = {}  # "block|solver" -> EMA of wall seconds

    def _flops(self, s: System) -> dict[str, float]:
        hp, rate = self.hp, self.flop_rate
        out: dict[str, float] = {}
        if s.dense:
            out["cholesky"] = cholesky_flops(s.n) / rate
            out["cg"] = cg_flops(s.n, s.nnz, s.kappa, hp.eps) / rate
        else:
            per_iter = (s.matvec_s or 0.0) + 10.0 * s.n / rate
            out["cg"] = cg_iterations(s.kappa, hp.eps, s.n) * per_iter
        return out

    def _query_s(self, s: System) -> float:
        """Seconds one oracle query costs beyond its gates: a matrix-free block's row is one operator product
        (``oracle_cost: row``); a stored matrix's row is read, not computed (0)."""
        if s.dense or s.matvec_s is None or self.hp.oracle_cost == "gate":
            return 0.0
        return float(s.matvec_s)

    def decide(self, s: System, step: int) -> Decision:
        """Predict every candidate's cost for ``s`` and choose (see the module doc)."""
        hp = self.hp
        flops = self._flops(s)
        seen = {k: self.measured[f"{s.block}|{k}"] for k in flops if f"{s.block}|{k}" in self.measured}
        use_measured = hp.classical_cost == "measured"
        predicted = {k: (seen.get(k, v) if use_measured else v) for k, v in flops.items()}
        q = quantum_cost(
            s.n, s.kappa_q, s.d, s.alpha, eps=hp.eps, model=hp.quantum_model, gate_time=hp.gate_time,
            walk_constant=hp.walk_constant, state_prep=hp.state_prep, readout=hp.readout,
            readout_tol=hp.readout_tol, query_s=self._query_s(s),
        )
        detail = {"queries": q.queries, "solve_s": q.solve_s, "prep_s": q.prep_s, "shots": float(q.shots),
                  "with_readout_s": q.with_readout_s, "gate_time": hp.gate_time, "query_s": self._query_s(s)}
        predicted["quantum"] = q.total_s if math.isfinite(s.kappa_q) else math.inf
        classical = {k: v for k, v in predicted.items() if k != "quantum"}
        best_c = min(classical, key=classical.get)
        basis = "measured" if use_measured and best_c in seen else "flop model"
        if not self.quantum:
            chosen, reason = best_c, f"classical Newton: cheapest classical solver ({basis})"
        elif hp.kappa_max is not None and s.kappa_q > hp.kappa_max:
            chosen, reason = best_c, f"κ={s.kappa_q:.3g} above kappa_max={hp.kappa_max:g}: classical ({basis})"
        elif predicted["quantum"] < classical[best_c]:
            ratio = classical[best_c] / max(predicted["quantum"], 1e-300)
            chosen, reason = "quantum", f"quantum predicted {ratio:.3g}x cheaper than {best_c} ({QUANTUM_NOTE})"
        else:
            ratio = predicted["quantum"] / max(classical[best_c], 1e-300)
            chosen, reason = best_c, f"{best_c} ({basis}) {ratio:.3g}x cheaper than the modelled quantum solve"
        return Decision(step, s.block, s.n, s.kappa, s.kappa_q, s.d, s.alpha, predicted, flops, seen, detail,
                        chosen, reason)

    def record(self, block: str, solver: str, seconds: float) -> None:
        """Fold a measured classical solve time into the block's moving average."""
        key = f"{block}|{solver}"
        old = self.measured.get(key)
        self.measured[key] = seconds if old is None else 0.5 * old + 0.5 * seconds


def solve_cholesky(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Solve SPD ``(n, n)`` ``a`` x = ``(n,)`` ``b`` by Cholesky; a failed factorisation falls back to lstsq."""
    chol, info = torch.linalg.cholesky_ex(a)  # (n, n) lower
    if int(info) == 0:
        return torch.cholesky_solve(b.unsqueeze(1), chol).squeeze(1), "cholesky"
    return torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1), "cholesky failed (not PD numerically): lstsq"


def solve_cg(matvec: Any, b: torch.Tensor, eps: float, n: int) -> tuple[torch.Tensor, str]:
    """Solve ``A x = b`` by conjugate gradients (scipy) to relative residual ``eps``.

    ``matvec`` is a dense ``(n, n)`` float64 tensor or a float64 numpy ``v -> A v`` function.
    """
    if isinstance(matvec, torch.Tensor):
        op: Any = matvec.numpy()
    else:
        op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    x, info = cg(op, b.numpy(), rtol=eps, maxiter=max(10, 2 * n))
    note = "cg" if info == 0 else f"cg stopped after {info} iterations without reaching rtol {eps:g}"
    return torch.from_numpy(np.asarray(x, dtype=np.float64)), note


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """``(fn(*args), wall seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0
