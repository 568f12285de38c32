"""Newton and Q-Newton steps over blocks of parameters (a ``TrainOptimizer``).

One step at learning rate ``lr``:

1. loss and gradient (one forward and backward);
2. per block (a tensor, a LoRA pair, a layer; ``block``): the curvature as a curvlinops operator,
   materialised when the block has at most ``exact_max`` parameters;
3. extremal eigenvalues (exact, or Lanczos on the operator), the damping λ (Q-Newton's
   regularisation, positive definiteness, optional κ target) and κ of ``H + λI``;
4. for ``q-newton``, the system the quantum solver would get: symmetric top-k sparsification
   (``row_keep``) with its sparsity d and κ;
5. the scheduler's decision (predicted costs of Cholesky, CG and the modelled quantum solver);
6. the solve -- always classical: a "quantum" decision solves the sparsified system classically
   and is charged the modelled quantum time in the accounts, its wall time kept apart;
7. ``θ_b -= lr * x_b`` for every block (the whole step's norm clipped to ``max_step_norm``).

Every decision is kept in :attr:`NewtonOptimizer.decisions` and, with ``log_path``, appended to
a JSONL file; :attr:`NewtonOptimizer.history` holds one summary per step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from expertkit.errors import ConfigError
from expertkit.optim.newton.curvature import Problem, closure_jacobian, closure_problem, dense_matrix, numpy_matvec, operator
from expertkit.optim.newton.curvature import JacobianFisher, forward_ad_friendly
from expertkit.optim.newton.params import NewtonParams
from expertkit.optim.newton.scheduler import QUANTUM_NOTE, Decision, Scheduler, System, solve_cg, solve_cholesky, timed
from expertkit.optim.newton.sparsify import row_sparsity, symmetric_topk
from expertkit.optim.newton.spectrum import damping_for, exact_extremes, kappa_bound, lanczos_extremes
from expertkit.optim.zo.blocks import group_blocks

NOTICE = "q-newton: the quantum linear solver is a cost model; every solve runs classically on this machine."


class NewtonOptimizer:
    """Block-wise damped Newton with a classical/quantum solver scheduler (see the module doc)."""

    def __init__(
        self, params: Sequence[torch.nn.Parameter], hp: NewtonParams | None = None, *, quantum: bool = False,
        names: Sequence[str] | None = None, model: Any = None, seed: int = 0,
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise ConfigError("a Newton optimizer got no trainable parameters.")
        if names is not None and len(names) != len(self.params):
            raise ConfigError(f"got {len(names)} names for {len(self.params)} parameters.")
        self.hp = hp or NewtonParams()
        self.quantum, self.model, self.seed = quantum, model, seed
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.params))]
        if self.hp.block == "tensor":
            self.blocks = [(n, [i]) for i, n in enumerate(self.names)]
        else:
            self.blocks = group_blocks(self.names, len(self.params), "none" if self.hp.block == "none" else self.hp.block)
        self.scheduler = Scheduler(self.hp, quantum=quantum, flop_rate=self.hp.flop_rate)
        self.t = 0
        self.decisions: list[Decision] = []
        self.history: list[dict[str, Any]] = []
        self.name = "q-newton" if quantum else "newton"
        if quantum:
            _say(NOTICE, always=True)  # shown even with --quiet: the quantum solver is never run

    # ------------------------------------------------------------------ steps
    def step(self, loss_fn: Callable[[], torch.Tensor], lr: float) -> float:
        """One Newton step on a training-loop closure (per-example losses ``(batch,)``); returns the loss."""
        start = time.perf_counter()
        rng = torch.get_rng_state()
        with torch.enable_grad():
            losses = loss_fn().reshape(-1)  # (B,)
            loss = losses.float().mean()
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        problem = closure_problem(self.model, loss_fn, int(losses.numel()), rng)
        self._newton(problem, grads, lr, start)
        return float(loss.detach())

    def step_problem(self, model: torch.nn.Module, loss_func: torch.nn.Module, X: torch.Tensor, y: torch.Tensor,
                     lr: float) -> float:
        """One Newton step on ``loss_func(model(X), y)`` (every curvature, GGN included); returns the loss."""
        start = time.perf_counter()
        problem = Problem(model, loss_func, X, y)
        with torch.enable_grad():
            loss = problem.loss()
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        self._newton(problem, grads, lr, start)
        return float(loss.detach())

    # ------------------------------------------------------------------ the Newton direction
    def _newton(self, problem: Problem, grads: Sequence[torch.Tensor | None], lr: float, start: float) -> None:
        hp = self.hp
        flat = [(g if g is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                for p, g in zip(self.params, grads, strict=True)]
        with sdpa_kernel([SDPBackend.MATH]), forward_ad_friendly():
            steps, step_decisions, total = self._directions(problem, flat)
        scale = lr
        if hp.max_step_norm is not None and total * lr > hp.max_step_norm:
            scale = hp.max_step_norm / total
        with torch.no_grad():
            for i, s in steps.items():
                p = self.params[i]
                p.add_(s.to(p.dtype).view_as(p), alpha=-scale)
        self._account(step_decisions, time.perf_counter() - start, total)
        self.t += 1

    def _directions(self, problem: Problem, flat: list[torch.Tensor]) -> tuple[dict[int, torch.Tensor], list, float]:
        """Newton directions per tensor id, the decisions, and the direction's norm."""
        hp = self.hp
        jt = None
        if problem.closure and hp.curvature == "fisher":
            jt = closure_jacobian(problem, self.params)  # (P, B), one pass for every block
            offsets = [0]
            for p in self.params:
                offsets.append(offsets[-1] + p.numel())
        steps: dict[int, torch.Tensor] = {}
        step_decisions: list[Decision] = []
        for key, ids in self.blocks:
            g = torch.cat([flat[i] for i in ids])  # (n,)
            if not bool(g.abs().max() > 0):
                continue  # zero gradient: nothing to solve (e.g. lora_A while lora_B is still 0)
            params_b = [self.params[i] for i in ids]
            if jt is not None:
                op = JacobianFisher(torch.cat([jt[offsets[i]:offsets[i + 1]] for i in ids]), problem.batch)
            else:
                op = operator(hp.curvature, problem, params_b)
            dec, x = self._solve_block(key, op, g)
            step_decisions.append(dec)
            off = 0
            for i in ids:
                steps[i] = x[off:off + self.params[i].numel()]
                off += self.params[i].numel()
        return steps, step_decisions, math.sqrt(sum(float(s.pow(2).sum()) for s in steps.values()))

    def _solve_block(self, key: str, op: Any, g: torch.Tensor) -> tuple[Decision, torch.Tensor]:
        """Spectrum, damping, sparsification, decision and the (classical) solve of one block."""
        hp, n = self.hp, g.numel()
        extra: dict[str, Any] = {}
        dense = n <= hp.exact_max
        matvec_s = None
        if dense:
            h = dense_matrix(op)  # (n, n) float64
            spec = exact_extremes(h)
            scale = float(h.abs().max())
        else:
            mv = numpy_matvec(op)
            t0 = time.perf_counter()
            spec = lanczos_extremes(mv, n, tol=hp.lanczos_tol, maxiter=hp.lanczos_maxiter, seed=self.seed + self.t)
            matvec_s = (time.perf_counter() - t0) / max(spec.matvecs, 1)
            scale = max(abs(spec.lmin), abs(spec.lmax))
        extra.update(lmin=spec.lmin, lmax=spec.lmax, spectrum=spec.method, matvecs=spec.matvecs)
        if scale == 0.0 and hp.damping == 0.0:
            lam = 1.0
            extra["note"] = "zero curvature: λ=1 (a gradient step)"
        else:
            lam = damping_for(spec, scale, damping=hp.damping, damping_rel=hp.damping_rel, kappa_target=hp.kappa_target)
        extra["lambda"] = lam
        extra["kappa_raw"] = _finite(spec.kappa())
        kappa = spec.kappa(lam)
        if dense:
            a = h + lam * torch.eye(n, dtype=torch.float64)  # (n, n) the damped system
            s_mat, d, kappa_q, s_lmax = a, row_sparsity(a), kappa, spec.lmax + lam
            if self.quantum and hp.row_keep < 1.0:
                s_mat, d = symmetric_topk(a, max(1, math.floor(hp.row_keep * n)))
                sq = exact_extremes(s_mat)
                kappa_q, s_lmax = sq.kappa(), sq.lmax
            extra["kappa_bound_paper"] = _finite(kappa_bound(a)) if n <= 256 else None
            alpha = d * float(s_mat.abs().max()) / s_lmax
            system = System(key, n, True, kappa, kappa_q, d, alpha, int((a != 0).sum()))
        else:
            system = System(key, n, False, kappa, kappa, n, float(n), n * n, matvec_s)

            def damped(v: Any, _mv: Any = mv, _lam: float = lam) -> Any:
                return _mv(v) + _lam * v

        dec = self.scheduler.decide(system, self.t)
        dec.extra = extra
        if dec.chosen == "cholesky":
            (x, note), secs = timed(solve_cholesky, a, g)
        elif dec.chosen == "cg":
            (x, note), secs = timed(solve_cg, a if dense else damped, g, hp.eps, n)
        elif dense:  # quantum: the sparsified system, solved classically
            (x, note), secs = timed(solve_cholesky, s_mat, g)
            note = f"quantum stand-in ({QUANTUM_NOTE}): {note}"
        else:
            (x, note), secs = timed(solve_cg, damped, g, hp.eps, n)
            note = f"quantum stand-in ({QUANTUM_NOTE}): {note}"
        dec.measured_s = secs
        extra["solver_note"] = note
        if dec.chosen != "quantum":
            self.scheduler.record(key, dec.chosen, secs)
        return dec, x

    # ------------------------------------------------------------------ accounts and logs
    def _account(self, decisions: list[Decision], seconds: float, step_norm: float) -> None:
        quantum = [d for d in decisions if d.chosen == "quantum"]
        standin = sum(d.measured_s for d in quantum)
        kappas = [d.kappa for d in decisions if math.isfinite(d.kappa)]
        rec = {
            "step": self.t, "solves": len(decisions), "quantum_solves": len(quantum),
            "classical_s": seconds - standin, "standin_s": standin,
            "quantum_model_s": sum(d.predicted_s["quantum"] for d in quantum),
            "quantum_solve_only_s": sum(d.quantum_detail["solve_s"] for d in quantum),
            "quantum_with_readout_s": sum(d.quantum_detail["with_readout_s"] for d in quantum),
            "kappa_median": _median(kappas), "kappa_max": max(kappas) if kappas else None,
            "step_norm": step_norm,
        }
        self.history.append(rec)
        self.decisions.extend(decisions)
        if self.hp.log_path:
            path = Path(self.hp.log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                for d in decisions:
                    fh.write(json.dumps({"type": "decision", "optimizer": self.name, **d.as_dict()}) + "\n")
                fh.write(json.dumps({"type": "step", "optimizer": self.name, **rec}) + "\n")
        if self.hp.verbose:
            line = (f"{self.name} step {self.t + 1}: {len(decisions)} solves, κ median {_fmt(rec['kappa_median'])}"
                    f" max {_fmt(rec['kappa_max'])}; classical {rec['classical_s']:.3g} s measured")
            if self.quantum:
                line += (f"; {len(quantum)} sent to the quantum solver: {rec['quantum_model_s']:.3g} s modelled "
                         f"(solved classically in {standin:.3g} s)")
            _say(line)

    def state_dict(self) -> dict[str, Any]:
        """Step counter, measured-time averages and the per-step summaries."""
        return {"t": self.t, "measured": dict(self.scheduler.measured), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result."""
        self.t = int(state["t"])
        self.scheduler.measured = {str(k): float(v) for k, v in dict(state.get("measured", {})).items()}
        self.history = [dict(h) for h in state.get("history", [])]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _say(line: str, always: bool = False) -> None:
    from expertkit.progress import console, is_quiet

    if always or not is_quiet():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
