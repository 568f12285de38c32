"""Known-answer tests of the Newton parts: exact step on a quadratic, Hessian vs finite differences,
κ vs numpy, sparsification (symmetric, positive definite), damping to a κ target."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from expertkit.optim.newton import NewtonOptimizer, NewtonParams
from expertkit.optim.newton.curvature import Problem, closure_problem, dense_matrix, numpy_matvec, operator
from expertkit.optim.newton.sparsify import row_sparsity, symmetric_topk
from expertkit.optim.newton.spectrum import Spectrum, damping_for, exact_extremes, kappa_bound, lanczos_extremes
from tests.optim.quadratic import Quadratic


def _quadratic_loss(q: Quadratic):
    return lambda: (0.5 * q.theta @ q.A @ q.theta + q.b @ q.theta).reshape(1)  # (1,)


@pytest.mark.parametrize("exact_max,solver", [(10, "cholesky"), (4, "cg")])
def test_one_newton_step_solves_a_quadratic(exact_max: int, solver: str) -> None:
    q = Quadratic(10)
    hp = NewtonParams(curvature="hessian", damping_rel=0.0, exact_max=exact_max, eps=1e-12, verbose=False)
    opt = NewtonOptimizer([q.theta], hp, names=["theta"], model=q)
    opt.step(_quadratic_loss(q), lr=1.0)
    minimiser = -torch.linalg.solve(q.A, q.b)  # (10,)
    assert torch.allclose(q.theta.detach(), minimiser, atol=1e-8, rtol=0)
    (dec,) = opt.decisions
    assert dec.chosen == solver and dec.extra["lambda"] == 0.0
    assert dec.kappa == pytest.approx(float(np.linalg.cond(q.A.numpy())), rel=1e-6 if exact_max == 10 else 1e-2)


def test_q_newton_routes_to_the_quantum_model_and_still_solves_exactly() -> None:
    q = Quadratic(10)
    hp = NewtonParams(curvature="hessian", damping_rel=0.0, gate_time=1e-30, verbose=False)
    opt = NewtonOptimizer([q.theta], hp, names=["theta"], model=q, quantum=True)
    opt.step(_quadratic_loss(q), lr=1.0)
    (dec,) = opt.decisions
    assert dec.chosen == "quantum" and "solved classically" in dec.extra["solver_note"].replace("ran", "solved")
    assert torch.allclose(q.theta.detach(), -torch.linalg.solve(q.A, q.b), atol=1e-10, rtol=0)
    step = opt.history[0]
    assert step["quantum_solves"] == 1 and step["quantum_model_s"] == dec.predicted_s["quantum"] > 0


class _Tiny(torch.nn.Module):
    """10 parameters: a 3->2 tanh layer (6 + 2) and a 2->1 output without bias (2)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w1 = torch.nn.Parameter(torch.randn(2, 3, generator=gen, dtype=torch.float64))
        self.b1 = torch.nn.Parameter(torch.randn(2, generator=gen, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(1, 2, generator=gen, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T  # (B, 1)


def test_hessian_operator_matches_finite_differences() -> None:
    model = _Tiny()
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(12, 3, generator=gen, dtype=torch.float64)  # (12, 3)
    y = torch.randn(12, 1, generator=gen, dtype=torch.float64)  # (12, 1)
    params = list(model.parameters())
    H = dense_matrix(operator("hessian", Problem(model, torch.nn.MSELoss(), X, y), params))  # (10, 10)
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])

    def grad_at(theta: torch.Tensor) -> torch.Tensor:
        off = 0
        with torch.no_grad():
            for p in params:
                p.copy_(theta[off:off + p.numel()].view_as(p))
                off += p.numel()
        loss = torch.nn.functional.mse_loss(model(X), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    h = 1e-5
    fd = torch.stack([(grad_at(theta0 + h * e) - grad_at(theta0 - h * e)) / (2 * h)
                      for e in torch.eye(10, dtype=torch.float64)], dim=1)  # (10, 10)
    assert H.shape == (10, 10)
    assert torch.allclose(H, fd, atol=1e-7, rtol=1e-6)
    assert not torch.allclose(H, torch.zeros_like(H))


def test_closure_hessian_equals_the_problem_hessian() -> None:
    model = _Tiny()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 1, dtype=torch.float64)
    params = list(model.parameters())
    ref = dense_matrix(operator("hessian", Problem(model, torch.nn.MSELoss(), X, y), params))
    loss_fn = lambda: ((model(X) - y) ** 2).squeeze(1)  # noqa: E731  (5,) per-example squared errors
    got = dense_matrix(operator("hessian", closure_problem(model, loss_fn, 5, torch.get_rng_state()), params))
    assert torch.allclose(got, ref, atol=1e-12)


def test_kappa_estimates_match_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    ev = torch.logspace(-2, 2, 60, dtype=torch.float64)  # κ = 1e4
    a = q @ torch.diag(ev) @ q.T  # (60, 60)
    ref = np.linalg.eigvalsh(a.numpy())
    exact = exact_extremes(a)
    assert exact.lmin == pytest.approx(ref[0], rel=1e-10) and exact.lmax == pytest.approx(ref[-1], rel=1e-10)
    assert exact.kappa() == pytest.approx(1e4, rel=1e-8)
    lz = lanczos_extremes(lambda v: a.numpy() @ v, 60, tol=1e-10)
    assert lz.method == "lanczos" and lz.matvecs > 0
    assert lz.lmin == pytest.approx(ref[0], rel=1e-6) and lz.lmax == pytest.approx(ref[-1], rel=1e-8)
    assert lz.kappa(shift=1.0) == pytest.approx((ref[-1] + 1) / (ref[0] + 1), rel=1e-6)
    assert Spectrum(-1.0, 2.0, "exact").kappa() == math.inf
    assert kappa_bound(a) >= 1e4  # the paper's norm/determinant estimate is an upper bound


def test_damping_reaches_the_kappa_target() -> None:
    spec = Spectrum(0.01, 100.0, "exact")  # κ = 1e4
    lam = damping_for(spec, 100.0, damping_rel=0.0, kappa_target=100.0)
    assert lam == pytest.approx((100.0 - 100 * 0.01) / 99)  # = 1.0
    assert spec.kappa(lam) == pytest.approx(100.0)
    indefinite = Spectrum(-2.0, 10.0, "exact")
    lam = damping_for(indefinite, 10.0, damping_rel=1e-2)
    assert lam == pytest.approx(2.0 + 0.1) and indefinite.kappa(lam) == pytest.approx(12.1 / 0.1)
    assert damping_for(spec, 100.0) == pytest.approx(0.5)  # Q-Newton's 5e-3 max|H_ij|


def test_sparsification_keeps_symmetry_and_positive_definiteness() -> None:
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    a = m @ m.T / 40 + 0.05 * torch.eye(40, dtype=torch.float64)  # (40, 40) SPD, dense
    s, d = symmetric_topk(a, 5)
    assert torch.equal(s, s.T)
    assert d <= 5 and d == row_sparsity(s) and int((s != 0).sum(1).max()) == d
    lmin_a = float(torch.linalg.eigvalsh(a)[0])
    assert float(torch.linalg.eigvalsh(s)[0]) >= lmin_a - 1e-12  # S ⪰ A
    assert float(torch.linalg.eigvalsh(s - a)[0]) >= -1e-12
    c = torch.tensor([[1.0, 0.75, 0.75], [0.75, 1.0, 0.2], [0.75, 0.2, 1.0]], dtype=torch.float64)  # SPD
    assert float(torch.linalg.eigvalsh(c)[0]) > 0
    assert float(torch.linalg.eigvalsh(torch.where(c.abs() < 0.5, 0.0, c))[0]) < 0  # plain pruning: indefinite
    sc, dc = symmetric_topk(c, 2)
    assert dc <= 2 and torch.equal(sc, sc.T)
    assert float(torch.linalg.eigvalsh(sc)[0]) >= float(torch.linalg.eigvalsh(c)[0]) - 1e-12
    diag, d1 = symmetric_topk(a, 1)
    assert d1 == 1 and torch.allclose(diag, torch.diag(a.diag() + (a - torch.diag(a.diag())).abs().sum(1)))


def test_numpy_matvec_follows_the_operator() -> None:
    model = _Tiny()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    op = operator("ggn", Problem(model, torch.nn.MSELoss(), X, y), list(model.parameters()))
    v = np.arange(10, dtype=np.float64)
    assert np.allclose(numpy_matvec(op)(v), dense_matrix(op).numpy() @ v)


def test_lanczos_without_any_eigenvalue_is_a_clear_error_not_a_nan(monkeypatch):
    from scipy.sparse.linalg import ArpackNoConvergence

    from expertkit.errors import ConfigError
    from expertkit.optim.newton import spectrum

    def nothing(*args, **kwargs):
        raise ArpackNoConvergence("no convergence", np.array([]), np.zeros((5, 0)))

    monkeypatch.setattr(spectrum, "eigsh", nothing)
    with pytest.raises(ConfigError, match="Lanczos found no largest eigenvalue of a 5 x 5 curvature block in 7 "
                                          "iterations.*lanczos_maxiter.*exact_max >= 5"):
        spectrum.lanczos_extremes(lambda v: 2.0 * v, 5, maxiter=7)
