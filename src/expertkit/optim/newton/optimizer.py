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

With ``damping_mode="lm"`` the damping is one λ adapted by Levenberg-Marquardt (:mod:`.lm`): the
step is applied, the loss measured again, and a trial whose actual reduction falls short of the
quadratic model's prediction is undone and retried at a larger λ (every trial's decisions are
logged, marked accepted or not). Matrix-free blocks are then solved Hessian-free: ``krylov_dim``
Lanczos steps on the curvature operator (:mod:`.krylov`) give the solution for every λ, and κ
from the Ritz values, at no further curvature products.

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
from expertkit.optim.newton.krylov import lanczos
from expertkit.optim.newton.lm import LevenbergMarquardt
from expertkit.optim.newton.spectrum import Spectrum, damping_for, exact_extremes, kappa_bound, lanczos_extremes
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
        self.lm = LevenbergMarquardt(self.hp.lm_init) if self.hp.damping_mode == "lm" else None
        self.lm_started = False
        self.lm_top = 0.0  # the largest curvature eigenvalue of the last LM step (lm_relative)
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
        self._newton(problem, grads, lr, start, float(loss.detach()))
        return float(loss.detach())

    def step_problem(self, model: torch.nn.Module, loss_func: torch.nn.Module, X: torch.Tensor, y: torch.Tensor,
                     lr: float) -> float:
        """One Newton step on ``loss_func(model(X), y)`` (every curvature, GGN included); returns the loss."""
        start = time.perf_counter()
        problem = Problem(model, loss_func, X, y)
        with torch.enable_grad():
            loss = problem.loss()
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        self._newton(problem, grads, lr, start, float(loss.detach()))
        return float(loss.detach())

    # ------------------------------------------------------------------ the Newton direction
    def _newton(self, problem: Problem, grads: Sequence[torch.Tensor | None], lr: float, start: float,
                loss0: float) -> None:
        flat = [(g if g is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                for p, g in zip(self.params, grads, strict=True)]
        with sdpa_kernel([SDPBackend.MATH]), forward_ad_friendly():
            preps = self._prepare(problem, flat)
            if self.lm is None:
                steps, decisions, total, _ = self._solve_all(preps, None)
                self._apply(steps, self._scale(lr, total))
                lm_rec: dict[str, Any] = {}
            else:
                steps, decisions, total, lm_rec = self._lm_step(self.lm, problem, preps, lr, loss0)
        self._account(decisions, time.perf_counter() - start, total, lm_rec)
        self.t += 1

    def _scale(self, lr: float, total: float) -> float:
        hp = self.hp
        if hp.max_step_norm is not None and total * lr > hp.max_step_norm:
            return hp.max_step_norm / total
        return lr

    def _apply(self, steps: dict[int, torch.Tensor], scale: float) -> None:
        with torch.no_grad():
            for i, s in steps.items():
                p = self.params[i]
                p.add_(s.to(p.dtype).view_as(p), alpha=-scale)

    def _loss_now(self, problem: Problem) -> float:
        with torch.no_grad():
            if problem.closure:
                return float(problem.model(problem.X).float().mean())
            return float(problem.loss())

    def _lm_step(self, lm: LevenbergMarquardt, problem: Problem, preps: list[dict[str, Any]], lr: float,
                 loss0: float) -> tuple[dict[int, torch.Tensor], list[Decision], float, dict[str, Any]]:
        """Levenberg-Marquardt trials on the prepared blocks: solve at λ, measure, accept or undo and raise λ."""
        top = max((max(abs(p["spec"].lmax), abs(p["spec"].lmin)) for p in preps), default=0.0)
        if not self.lm_started:  # λ0 = τ · the largest curvature eigenvalue (scale-free start)
            lm.lam = self.hp.lm_init * top if top > 0 else self.hp.lm_init
            self.lm_started = True
        elif self.hp.lm_relative and top > 0 and self.lm_top > 0:
            # The curvature's scale can jump between steps (a LoRA leaving lora_B = 0: its GGN grew 6e5-fold
            # after one step on SmolLM2), and an absolute λ then takes many rejected trials to catch up.
            lm.lam = min(max(lm.lam * top / self.lm_top, lm.lam_min), lm.lam_max)
        if top > 0:
            self.lm_top = top
        decisions: list[Decision] = []
        trials = []
        steps: dict[int, torch.Tensor] = {}
        total = 0.0
        for _ in range(self.hp.lm_max_tries):
            lam = lm.lam
            steps, decs, total, terms = self._solve_all(preps, lam)
            scale = self._scale(lr, total)
            predicted = sum(scale * gx - 0.5 * scale * scale * xgx for gx, xgx in terms)
            self._apply(steps, scale)
            after = self._loss_now(problem)
            rho = lm.ratio(loss0, after, predicted)
            accepted = lm.update(rho)
            for d in decs:
                d.extra.update(lm_trial=len(trials), accepted=accepted)
            decisions.extend(decs)
            trials.append({"lambda": lam, "predicted": predicted, "loss_after": after, "rho": _finite(rho),
                           "accepted": accepted, "step_norm": total * scale})
            if accepted:
                break
            self._apply(steps, -scale)  # undo the rejected trial
        ok = bool(trials and trials[-1]["accepted"])
        return steps, decisions, (total if ok else 0.0), {"loss_before": loss0, "trials": trials, "accepted": ok,
                                                           "lambda_next": lm.lam}

    def _prepare(self, problem: Problem, flat: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Per block with a non-zero gradient: its gradient, curvature (matrix or operator) and spectrum."""
        hp = self.hp
        jt = None
        if problem.closure and hp.curvature == "fisher":
            jt = closure_jacobian(problem, self.params)  # (P, B), one pass for every block
            offsets = [0]
            for p in self.params:
                offsets.append(offsets[-1] + p.numel())
        preps = []
        for key, ids in self.blocks:
            g = torch.cat([flat[i] for i in ids])  # (n,)
            if not bool(g.abs().max() > 0):
                continue  # zero gradient: nothing to solve (e.g. lora_A while lora_B is still 0)
            if jt is not None:
                op = JacobianFisher(torch.cat([jt[offsets[i]:offsets[i + 1]] for i in ids]), problem.batch)
            else:
                op = operator(hp.curvature, problem, [self.params[i] for i in ids])
            preps.append(self._prepare_block(key, ids, op, g))
        return preps

    def _prepare_block(self, key: str, ids: list[int], op: Any, g: torch.Tensor) -> dict[str, Any]:
        hp, n = self.hp, g.numel()
        prep: dict[str, Any] = {"key": key, "ids": ids, "g": g, "n": n, "dense": n <= hp.exact_max}
        if prep["dense"]:
            h = dense_matrix(op)  # (n, n) float64
            prep.update(h=h, spec=exact_extremes(h), scale=float(h.abs().max()))
            return prep
        mv = numpy_matvec(op)
        t0 = time.perf_counter()
        if self.lm is not None:  # Hessian-free: one Krylov basis serves every λ of the LM trials
            basis = lanczos(lambda v: torch.from_numpy(mv(v.numpy())), g, hp.krylov_dim)
            ritz = basis.ritz()
            spec = Spectrum(float(ritz[0]), float(ritz[-1]), "lanczos-ritz", basis.matvecs)
            prep["basis"] = basis
        else:
            spec = lanczos_extremes(mv, n, tol=hp.lanczos_tol, maxiter=hp.lanczos_maxiter, seed=self.seed + self.t)
        prep.update(mv=mv, spec=spec, scale=max(abs(spec.lmin), abs(spec.lmax)),
                    matvec_s=(time.perf_counter() - t0) / max(spec.matvecs, 1))
        return prep

    def _solve_all(self, preps: list[dict[str, Any]], lam: float | None) -> tuple[
            dict[int, torch.Tensor], list[Decision], float, list[tuple[float, float]]]:
        """Directions per tensor id, decisions, the direction's norm and per block ``(gᵀx, xᵀGx)``."""
        steps: dict[int, torch.Tensor] = {}
        decisions, terms = [], []
        for prep in preps:
            dec, x = self._solve_block(prep, lam)
            decisions.append(dec)
            terms.append(self._model_terms(prep, x))
            off = 0
            for i in prep["ids"]:
                steps[i] = x[off:off + self.params[i].numel()]
                off += self.params[i].numel()
        return steps, decisions, math.sqrt(sum(float(s.pow(2).sum()) for s in steps.values())), terms

    @staticmethod
    def _model_terms(prep: dict[str, Any], x: torch.Tensor) -> tuple[float, float]:
        """``gᵀx`` and ``xᵀGx`` with the block's undamped curvature (for LM's predicted reduction)."""
        if "h" in prep:
            return float(prep["g"] @ x), float(x @ prep["h"] @ x)
        return float(prep["g"] @ x), float(x.numpy() @ prep["mv"](x.numpy()))

    def _solve_block(self, prep: dict[str, Any], lam_lm: float | None) -> tuple[Decision, torch.Tensor]:
        """Damping, sparsification, decision and the (classical) solve of one prepared block."""
        hp, n, g, spec, key = self.hp, prep["n"], prep["g"], prep["spec"], prep["key"]
        dense, scale = prep["dense"], prep["scale"]
        extra: dict[str, Any] = {"lmin": spec.lmin, "lmax": spec.lmax, "spectrum": spec.method,
                                 "matvecs": spec.matvecs}
        if lam_lm is not None:
            lam = lam_lm
            if spec.lmin + lam <= 0:  # an indefinite block (Hessian): shift to positive definite
                lam = -spec.lmin + max(lam, 1e-12 * max(scale, 1.0))
                extra["note"] = "indefinite block: λ raised to make it positive definite"
        elif scale == 0.0 and hp.damping == 0.0:
            lam = 1.0
            extra["note"] = "zero curvature: λ=1 (a gradient step)"
        else:
            lam = damping_for(spec, scale, damping=hp.damping, damping_rel=hp.damping_rel, kappa_target=hp.kappa_target)
        extra["lambda"] = lam
        extra["kappa_raw"] = _finite(spec.kappa())
        kappa = spec.kappa(lam)
        if dense:
            a = prep["h"] + lam * torch.eye(n, dtype=torch.float64)  # (n, n) the damped system
            s_mat, d, kappa_q, s_lmax = a, row_sparsity(a), kappa, spec.lmax + lam
            if self.quantum and hp.row_keep < 1.0:
                s_mat, d = symmetric_topk(a, max(1, math.floor(hp.row_keep * n)))
                sq = exact_extremes(s_mat)
                kappa_q, s_lmax = sq.kappa(), sq.lmax
            extra["kappa_bound_paper"] = _finite(kappa_bound(a)) if n <= 256 else None
            alpha = d * float(s_mat.abs().max()) / s_lmax
            system = System(key, n, True, kappa, kappa_q, d, alpha, int((a != 0).sum()))
        else:
            system = System(key, n, False, kappa, kappa, n, float(n), n * n, prep["matvec_s"])

            def damped(v: Any, _mv: Any = prep["mv"], _lam: float = lam) -> Any:
                return _mv(v) + _lam * v

        dec = self.scheduler.decide(system, self.t)
        dec.extra = extra
        if "basis" in prep:  # Hessian-free LM: the Krylov solution (= m CG steps), classical either way
            (x, note), secs = timed(lambda: (prep["basis"].solve(lam)[0], f"krylov m={prep['basis'].dim}"))
            if dec.chosen == "quantum":
                note = f"quantum stand-in ({QUANTUM_NOTE}): {note}"
        elif dec.chosen == "cholesky":
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
    def _account(self, decisions: list[Decision], seconds: float, step_norm: float, lm_rec: dict[str, Any]) -> None:
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
            "step_norm": step_norm, **({"lm": lm_rec} if lm_rec else {}),
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
        out = {"t": self.t, "measured": dict(self.scheduler.measured), "history": list(self.history)}
        if self.lm is not None and self.lm_started:
            out["lm"] = {**self.lm.state_dict(), "top": self.lm_top}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result."""
        self.t = int(state["t"])
        self.scheduler.measured = {str(k): float(v) for k, v in dict(state.get("measured", {})).items()}
        self.history = [dict(h) for h in state.get("history", [])]
        if self.lm is not None and "lm" in state:
            self.lm.lam, self.lm.nu = float(state["lm"]["lam"]), float(state["lm"]["nu"])
            self.lm_top = float(state["lm"].get("top", 0.0))
            self.lm_started = True


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
