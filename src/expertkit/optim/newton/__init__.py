"""Q-Newton: Newton steps with a classical / quantum linear-solver scheduler.

**A quantum computer is not used.** The quantum linear-systems solver is a *cost model*
(:mod:`~expertkit.optim.newton.costs`): the scheduler may choose it for a solve, and that solve
is then carried out classically, its modelled quantum time accounted apart.

Importing this package registers two methods in ``expertkit.train.OPTIMIZERS``:

* ``newton``: block-wise damped Newton, classical solvers only (Cholesky or CG per block);
* ``q-newton``: the same step with Q-Newton's scheduler (Li, Liu, Wang, Chen 2024): per block
  it estimates κ, regularises, sparsifies for the quantum oracle (sparsity d) and sends each
  solve to the solver with the lowest predicted cost.

Parts: :mod:`.curvature` (Hessian / GGN / empirical Fisher as curvlinops operators),
:mod:`.spectrum` (exact and Lanczos κ, damping), :mod:`.sparsify` (symmetric top-k, kept
positive definite), :mod:`.costs` (flop and QLSA cost models), :mod:`.scheduler`,
:mod:`.optimizer` (:class:`NewtonOptimizer`) and, when qiskit is installed, :mod:`.hhl`
(an HHL circuit for systems up to 16 x 16 on qiskit-aer's statevector simulator).
"""

from __future__ import annotations

import torch

from expertkit.optim.newton.costs import quantum_cost
from expertkit.optim.newton.optimizer import NOTICE, NewtonOptimizer
from expertkit.optim.newton.params import NewtonParams
from expertkit.optim.newton.scheduler import Decision, Scheduler, System
from expertkit.optim.newton.sparsify import symmetric_topk
from expertkit.optim.newton.spectrum import damping_for, exact_extremes, lanczos_extremes
from expertkit.train.optimizers import OPTIMIZERS, OptimizerSetup

PAPER = ("Li, Liu, Wang, Chen: Hybrid Quantum-Classical Scheduling for Accelerating Neural Network Training "
         "with Newton's Gradient Descent (Q-Newton), arXiv:2405.00252")


def _factory(quantum: bool):  # noqa: ANN202
    def build(params: list[torch.nn.Parameter], setup: OptimizerSetup) -> NewtonOptimizer:
        return NewtonOptimizer(params, setup.hparams, quantum=quantum, names=setup.names, model=setup.model,
                               seed=setup.seed)

    build.__doc__ = NewtonOptimizer.__doc__
    return build


OPTIMIZERS.add("newton", _factory(False), params=NewtonParams, second_order=True,
               summary="block-wise damped Newton (Hessian/GGN/Fisher via curvlinops; Cholesky or CG per block)",
               paper="Newton's method; curvature operators from curvlinops")
OPTIMIZERS.add("q-newton", _factory(True), params=NewtonParams, second_order=True,
               summary="Newton with Q-Newton's classical/quantum solver scheduler (quantum cost MODELLED; "
                       "every solve runs classically)",
               paper=PAPER)

__all__ = [
    "NOTICE", "PAPER", "Decision", "NewtonOptimizer", "NewtonParams", "Scheduler", "System", "damping_for",
    "exact_extremes", "lanczos_extremes", "quantum_cost", "symmetric_topk",
]
