"""Hyperparameters of ``newton`` and ``q-newton`` (validated; unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from expertkit.config import Config


class NewtonParams(Config):
    """Hyperparameters shared by classical Newton and Q-Newton.

    The quantum linear solver is a cost model: with ``q-newton`` the scheduler may *choose* it,
    but every solve runs classically (see ``docs/newton.md``).
    """

    curvature: Literal["hessian", "ggn", "fisher"] = Field(
        "fisher", description="curvature: Hessian, generalized Gauss-Newton (needs model outputs) or empirical Fisher"
    )
    block: Literal["tensor", "linear", "layer", "attn-mlp", "none"] = Field(
        "tensor", description="one linear system per tensor, linear layer (LoRA pair), layer, attn/mlp part, or all"
    )
    exact_max: int = Field(1024, ge=1, description="blocks up to this size are materialised (exact κ, Cholesky)")
    damping: float = Field(0.0, ge=0, description="absolute damping λ added to the curvature diagonal")
    damping_rel: float = Field(5e-3, ge=0, description="damping as a fraction of max|H_ij| (Q-Newton's regularisation)")
    kappa_target: float | None = Field(None, gt=1, description="raise the damping until κ <= this (None = off)")
    row_keep: float = Field(1.0, gt=0, le=1, description="fraction of each row kept for the quantum solver (sparsity d)")
    eps: float = Field(1e-3, gt=0, lt=1, description="solver tolerance ε (CG residual; quantum solution error)")
    quantum_model: Literal["qnewton", "costa"] = Field(
        "qnewton", description="quantum cost model: the Q-Newton authors' closed form, or Costa et al.'s O(κ log 1/ε)"
    )
    walk_constant: float = Field(2305.0, gt=0, description="Costa et al. walk constant (2305 bound; 1.84 measured)")
    gate_time: float = Field(1e-6, gt=0, description="seconds per quantum gate in the cost model")
    oracle_cost: Literal["row", "gate"] = Field(
        "row", description="matrix-free blocks (Hessian-free): a query of the quantum solver's sparse-access oracle "
                           "costs one row of the operator, i.e. one measured operator product (no cheaper way to get "
                           "a row of a GGN is known), or only its gates (the paper's assumption for a stored matrix)"
    )
    state_prep: bool = Field(False, description="charge the preparation of |b> (2N gates per run)")
    readout: bool = Field(False, description="charge reading the solution out by tomography (the scheduler compares it)")
    readout_tol: float = Field(1e-2, gt=0, lt=1, description="l2 error of the tomography readout")
    kappa_max: float | None = Field(None, gt=1, description="never send a system with κ above this to the quantum solver")
    classical_cost: Literal["flops", "measured"] = Field(
        "flops", description="classical cost that decides: flop model (reproducible) or measured wall time"
    )
    flop_rate: float = Field(1e10, gt=0, description="flop/s of the flop model (measure: costs.measure_flop_rate())")
    lanczos_tol: float = Field(1e-3, gt=0, description="relative tolerance of the Lanczos eigenvalues")
    lanczos_maxiter: int | None = Field(None, ge=1, description="Lanczos iteration cap (None = 20 n)")
    damping_mode: Literal["fixed", "lm"] = Field(
        "fixed", description="fixed: damping/damping_rel per block; lm: one λ adapted by Levenberg-Marquardt "
                             "(ratio of actual to predicted loss reduction; a rejected trial is undone and retried)"
    )
    lm_init: float = Field(1e-3, gt=0, description="lm: initial λ as a fraction τ of the first step's largest curvature "
                                                   "eigenvalue (Nielsen's μ0 = τ max); adapted from then on")
    lm_relative: bool = Field(False, description="lm: at every step rescale λ by the change of the largest curvature "
                                                   "eigenvalue, so λ stays the same fraction of the curvature's scale "
                                                   "(off: λ carries over in absolute terms)")
    lm_max_tries: int = Field(12, ge=1, description="lm: trials per step (each one loss evaluation) before the step is "
                                                   "given up (parameters kept)")
    krylov_dim: int = Field(20, ge=1, description="lm: Lanczos dimension m of a matrix-free block (m curvature products)")
    max_step_norm: float | None = Field(None, gt=0, description="clip the norm of the whole Newton step (None = off)")
    log_path: str | None = Field(None, description="append every decision to this JSONL file")
    verbose: bool = Field(True, description="print one summary line per step")
