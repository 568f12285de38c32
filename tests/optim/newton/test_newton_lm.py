"""Known-answer tests of the Levenberg-Marquardt damping and the Hessian-free (Krylov) Newton solve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.optim.newton import NewtonOptimizer, NewtonParams
from expertkit.optim.newton.curvature import Problem, dense_matrix, operator
from expertkit.optim.newton.krylov import lanczos
from expertkit.optim.newton.lm import LevenbergMarquardt
from tests.optim.quadratic import Quadratic


def _spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(-2, 1, n, dtype=torch.float64)) @ q.T  # (n, n), κ = 1e3


def _cg(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Textbook conjugate gradients from x = 0 (the reference for the Krylov solution)."""
    x, r = torch.zeros_like(b), b.clone()
    p = r.clone()
    for _ in range(steps):
        ap = a @ p
        alpha = (r @ r) / (p @ ap)
        x, r_new = x + alpha * p, r - alpha * ap
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    return x


def test_lanczos_basis_solves_every_shift_like_cg_and_exactly_at_full_dimension() -> None:
    a = _spd(12, 0)
    g = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    basis = lanczos(lambda v: a @ v, g, 5)
    assert basis.dim == 5 and basis.matvecs == 5
    assert torch.allclose(basis.Q.T @ basis.Q, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(basis.Q.T @ a @ basis.Q, basis.T(), atol=1e-12)
    for lam in (0.0, 0.1, 3.0):  # one basis, every λ: m CG steps on (A + λI)
        x, gx, xgx = basis.solve(lam)
        shifted = a + lam * torch.eye(12, dtype=torch.float64)
        assert torch.allclose(x, _cg(shifted, g, 5), atol=1e-9, rtol=1e-9)
        assert gx == pytest.approx(float(g @ x), rel=1e-10) and xgx == pytest.approx(float(x @ a @ x), rel=1e-10)
    full = lanczos(lambda v: a @ v, g, 12)
    assert torch.allclose(full.solve(0.5)[0], torch.linalg.solve(a + 0.5 * torch.eye(12, dtype=torch.float64), g),
                          atol=1e-9)
    assert np.allclose(full.ritz(), np.linalg.eigvalsh(a.numpy()), rtol=1e-8)  # Ritz = spectrum at m = n


def test_lanczos_stops_on_an_invariant_subspace_and_refuses_a_zero_start() -> None:
    a = torch.diag(torch.tensor([1.0, 1.0, 4.0, 4.0], dtype=torch.float64))  # two distinct eigenvalues
    g = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    basis = lanczos(lambda v: a @ v, g, 4)
    assert basis.dim == 2  # K(A, g) has dimension 2: the Krylov solution is already exact
    assert torch.allclose(basis.solve(0.0)[0], g / a.diag(), atol=1e-12)
    with pytest.raises(ConfigError, match="non-zero start vector"):
        lanczos(lambda v: a @ v, torch.zeros(4, dtype=torch.float64), 3)


def test_nielsen_update_rule() -> None:
    lm = LevenbergMarquardt(1.0)
    assert lm.update(1.0) and lm.lam == pytest.approx(1 / 3)  # the model was exact: λ / 3
    assert lm.update(0.5) and lm.lam == pytest.approx(1 / 3)  # 1 - (2ρ - 1)³ = 1
    assert lm.update(0.25) and lm.lam == pytest.approx(1 / 3 * 1.125)  # 1 - (-0.5)³
    assert not lm.update(-0.1) and lm.lam == pytest.approx(0.375 * 2) and lm.nu == 4.0  # rejected: λ ν, ν 2ν
    assert not lm.update(-math.inf) and lm.lam == pytest.approx(0.375 * 8) and lm.nu == 8.0
    assert lm.update(0.9) and lm.nu == 2.0
    assert LevenbergMarquardt.ratio(2.0, 1.0, 2.0) == 0.5
    assert LevenbergMarquardt.ratio(2.0, math.nan, 1.0) == -math.inf
    assert LevenbergMarquardt.ratio(2.0, 1.0, 0.0) == -math.inf


def test_lm_newton_on_a_quadratic_predicts_exactly_and_shrinks_lambda() -> None:
    q = Quadratic(10)
    hp = NewtonParams(curvature="hessian", damping_mode="lm", lm_init=1e-3, verbose=False)
    opt = NewtonOptimizer([q.theta], hp, names=["theta"], model=q)
    opt.step(q.loss_fn, lr=1.0)
    lm = opt.history[0]["lm"]
    (trial,) = lm["trials"]
    assert trial["accepted"] and trial["rho"] == pytest.approx(1.0, abs=1e-6)  # the model is the loss (float32 loss)
    lam0 = 1e-3 * float(torch.linalg.eigvalsh(q.A)[-1])  # λ0 = τ λ_max
    assert opt.decisions[0].extra["lambda"] == pytest.approx(lam0, rel=1e-10) and opt.decisions[0].extra["accepted"]
    assert lm["lambda_next"] == pytest.approx(lam0 / 3)
    minimiser = -torch.linalg.solve(q.A, q.b)
    assert torch.allclose(q.theta.detach(), minimiser, atol=1e-2)  # λ = 1e-3 against eigenvalues >= 1


class _Softmax(torch.nn.Module):
    """Softmax regression 4 -> 3 (15 parameters), started far from its optimum."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3).double()
        with torch.no_grad():
            self.lin.weight.fill_(0.0)
            self.lin.weight[0, 0] = 6.0  # confidently wrong on half of the data
            self.lin.bias.fill_(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # (B, 3)


def _softmax_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(32, 4, generator=gen, dtype=torch.float64)  # (32, 4)
    y = (X[:, 1] > 0).long() + (X[:, 2] > 1).long()  # (32,) classes 0..2
    return X, y


def test_lm_rejects_an_overshooting_gauss_newton_step_and_restores_the_parameters() -> None:
    X, y = _softmax_data()
    ce = torch.nn.CrossEntropyLoss()
    model = _Softmax()
    start = [p.detach().clone() for p in model.parameters()]
    loss0 = float(ce(model(X), y).detach())
    hp = NewtonParams(curvature="ggn", damping_mode="lm", lm_init=1e-3, block="none", verbose=False)
    opt = NewtonOptimizer(list(model.parameters()), hp, names=["w", "b"], model=model)
    opt.step_problem(model, ce, X, y, lr=1.0)
    trials = opt.history[0]["lm"]["trials"]
    assert not trials[0]["accepted"] and trials[0]["loss_after"] > loss0  # the bare GN step overshoots
    lam0 = trials[0]["lambda"]
    assert lam0 == pytest.approx(1e-3 * opt.decisions[0].extra["lmax"])  # λ0 = τ λ_max
    assert trials[-1]["accepted"] and trials[-1]["lambda"] == pytest.approx(lam0 * 2 ** (len(trials) * (len(trials) - 1) // 2))
    assert float(ce(model(X), y)) == pytest.approx(trials[-1]["loss_after"]) and trials[-1]["loss_after"] < loss0
    # a fixed-damping step at the same λ is the overshooting trial
    ref = _Softmax()
    fixed = NewtonOptimizer(list(ref.parameters()), NewtonParams(curvature="ggn", damping=lam0, damping_rel=0.0,
                                                                 block="none", verbose=False), model=ref)
    fixed.step_problem(ref, ce, X, y, lr=1.0)
    assert float(ce(ref(X), y)) == pytest.approx(trials[0]["loss_after"], rel=1e-6)
    assert any(not torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start, strict=True))


def test_hessian_free_ggn_step_equals_the_dense_damped_solve() -> None:
    X, y = _softmax_data()
    ce = torch.nn.CrossEntropyLoss()
    dense_model, hf_model = _Softmax(), _Softmax()
    params = list(dense_model.parameters())
    G = dense_matrix(operator("ggn", Problem(dense_model, ce, X, y), params))  # (15, 15)
    g = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(ce(dense_model(X), y), params)]).double()
    hp = NewtonParams(curvature="ggn", damping_mode="lm", lm_init=0.3, block="none", exact_max=4, krylov_dim=15,
                      verbose=False)
    opt = NewtonOptimizer(list(hf_model.parameters()), hp, names=["w", "b"], model=hf_model)
    opt.step_problem(hf_model, ce, X, y, lr=1.0)
    dec = opt.decisions[0]
    lam = dec.extra["lambda"]
    assert lam == pytest.approx(0.3 * dec.extra["lmax"])
    x = torch.linalg.solve(G + lam * torch.eye(15, dtype=torch.float64), g)
    assert dec.extra["spectrum"] == "lanczos-ritz" and dec.extra["accepted"] and dec.n == 15
    moved = torch.cat([(p0 - p1).detach().reshape(-1) for p0, p1 in zip(params, hf_model.parameters(), strict=True)])
    assert torch.allclose(moved, x, atol=1e-8)
    ev = torch.linalg.eigvalsh(G)
    # Ritz values lie inside the spectrum: κ of the projected system <= κ of the full damped system
    assert 1.0 < dec.kappa <= float((ev[-1] + lam) / (ev[0] + lam)) * (1 + 1e-9)
    assert ev[0] - 1e-9 <= dec.extra["lmin"] <= dec.extra["lmax"] <= ev[-1] + 1e-9 and dec.extra["matvecs"] <= 15


def _tiny_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from expertkit.train.data import collate

    rows = [([5, 9, 14], [40, 2]), ([7, 8], [33, 2]), ([20, 21, 22, 23], [50, 2])]  # (prompt, answer + eos)
    return collate(rows, pad_id=0)  # (3, 6) each


def test_answer_problem_loss_is_the_training_loss_and_its_ggn_is_jt_h_j() -> None:
    from expertkit.models.tiny import tiny_model
    from expertkit.optim.newton.causal_lm import answer_problem
    from expertkit.train.data import per_example_loss

    model = tiny_model("llama").double()
    ids, mask, labels = _tiny_batch()
    problem = answer_problem(model, ids, mask, labels)
    assert problem.X.shape[0] == 6 and problem.y.tolist() == [40, 2, 33, 2, 50, 2]
    with torch.no_grad():
        assert float(problem.loss()) == pytest.approx(float(per_example_loss(model, ids, mask, labels).mean()), rel=1e-6)
    w = model.model.norm.weight  # (hidden,): a small block whose curvature runs through the head
    G = dense_matrix(operator("ggn", problem, [w]))  # (hidden, hidden)
    base = w.detach().clone()

    def logits_at(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            w.copy_(v)
        return problem.model(problem.X)  # (T, V)

    with torch.no_grad():
        p = torch.softmax(logits_at(base), -1)  # (T, V)
    J = torch.autograd.functional.jacobian(lambda v: torch.func.functional_call(
        problem.model, {"model.model.norm.weight": v}, (problem.X,)), base)  # (T, V, hidden)
    logits_at(base)
    ref = sum(J[t].T @ (torch.diag(p[t]) - torch.outer(p[t], p[t])) @ J[t] for t in range(6)) / 6
    assert torch.allclose(G, ref, atol=1e-10) and float(G.abs().max()) > 1e-6


def test_answer_problem_refuses_answers_of_different_lengths() -> None:
    from expertkit.optim.newton.causal_lm import answer_problem

    ids, mask, labels = _tiny_batch()
    labels[0, 3] = -100  # row 0 keeps one labelled token, the others two
    with pytest.raises(ConfigError, match="answer lengths differ across the batch"):
        answer_problem(torch.nn.Identity(), ids, mask, labels)


@pytest.mark.parametrize("relative", [False, True])
def test_lm_relative_rescales_lambda_by_the_change_of_the_curvature_scale(relative: bool) -> None:
    X, y = _softmax_data()
    ce = torch.nn.CrossEntropyLoss()
    model = _Softmax()
    hp = NewtonParams(curvature="ggn", damping_mode="lm", lm_init=1e-3, lm_relative=relative, block="none",
                      verbose=False)
    opt = NewtonOptimizer(list(model.parameters()), hp, names=["w", "b"], model=model)
    for _ in range(2):
        opt.step_problem(model, ce, X, y, lr=1.0)
    first = [d for d in opt.decisions if d.step == 0]
    second = [d for d in opt.decisions if d.step == 1]
    top1, top2 = (max(abs(d.extra["lmax"]), abs(d.extra["lmin"])) for d in (first[0], second[0]))
    assert not math.isclose(top1, top2, rel_tol=1e-3)  # the curvature's scale did change between the steps
    carried = opt.history[0]["lm"]["lambda_next"]
    expected = carried * top2 / top1 if relative else carried
    assert second[0].extra["lambda"] == pytest.approx(expected, rel=1e-9)
    state = opt.state_dict()
    assert state["lm"]["top"] == pytest.approx(top2)
