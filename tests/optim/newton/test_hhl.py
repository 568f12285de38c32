"""HHL on qiskit-aer's statevector simulator: fidelity on small systems and the 1/κ² success law."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qiskit")
pytest.importorskip("qiskit_aer")

from expertkit.errors import ConfigError  # noqa: E402
from expertkit.optim.newton.hhl import hhl_solve  # noqa: E402


def test_hhl_solves_a_two_by_two_system() -> None:
    a = np.array([[1.5, 0.5], [0.5, 1.5]])  # eigenvalues 1 and 2
    r = hhl_solve(a, np.array([1.0, 0.0]), clock_qubits=5)
    x = np.linalg.solve(a, [1.0, 0.0])
    assert r.fidelity > 0.999 and r.qubits == 5 + 1 + 1
    assert np.allclose(r.state.real, x / np.linalg.norm(x), atol=0.03) and np.allclose(r.state.imag, 0, atol=0.03)


@pytest.mark.parametrize("kappa", [2.0, 8.0])
def test_worst_case_success_probability_is_one_over_kappa_squared(kappa: float) -> None:
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    ev = np.array([1.0, 1.5, 0.5 * (1 + kappa), kappa])  # λ_min 1, λ_max κ
    a = q @ np.diag(ev) @ q.T
    r = hhl_solve(0.5 * (a + a.T), q[:, 3], clock_qubits=6)  # b along the top eigenvector
    assert r.kappa == pytest.approx(kappa)
    assert r.success_probability == pytest.approx(1 / kappa**2, rel=0.1)
    assert r.fidelity > 0.99


def test_bad_systems_are_refused() -> None:
    with pytest.raises(ConfigError, match="N <= 16"):
        hhl_solve(np.eye(17), np.ones(17))
    with pytest.raises(ConfigError, match="positive definite"):
        hhl_solve(np.diag([1.0, -1.0]), np.ones(2))
