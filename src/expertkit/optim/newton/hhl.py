"""An HHL circuit for tiny systems (N <= 16) on qiskit-aer's statevector simulator.

Beyond the paper, to check what the cost model assumes: the solution fidelity HHL reaches, and
how its success probability falls with κ. Needs the optional ``qiskit`` and ``qiskit-aer``
(``pip install 'expertkit[quantum]'``); a simulator on this machine, not quantum hardware.

Circuit (Harrow, Hassidim, Lloyd 2009), with ``m`` clock qubits, ``n = log2 N`` system qubits and
one ancilla:

1. prepare ``|b⟩`` (normalised; ``N`` padded to a power of two with the largest eigenvalue on
   the added diagonal, so κ is unchanged and the padded solution entries are 0);
2. phase estimation of ``U = exp(iAt)`` with ``t = 2π (2^m - 1) / (2^m λ_max)``: eigenvalue λ
   lands near clock value ``k = 2^m λ t / 2π``;
3. a uniformly controlled RY on the ancilla, angle ``2 arcsin(min(1, C / λ_k))`` with ``C = λ_min``,
   so the ancilla's ``|1⟩`` amplitude is ``C/λ``;
4. phase estimation undone; post-select ancilla 1 and clock 0. The system register then holds
   ``|x⟩ ∝ A⁻¹|b⟩``, found with probability ``p`` -- which scales as ``1/κ²``: ``O(κ²)`` repetitions,
   ``O(κ)`` with amplitude amplification (what the cost models assume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from expertkit.errors import ConfigError

MAX_N = 16


@dataclass(frozen=True)
class HHLResult:
    """What one simulated HHL run gave."""

    state: np.ndarray  # (N,) the post-selected solution state, normalised, global phase fixed
    fidelity: float  # |⟨x_classical/|x| , state⟩|² (the solve of reference is numpy's)
    success_probability: float  # probability of the post-selection (ancilla 1, clock 0)
    kappa: float
    qubits: int
    clock_qubits: int


def hhl_solve(a: np.ndarray, b: np.ndarray, clock_qubits: int = 6) -> HHLResult:
    """Solve SPD ``a`` x = ``b`` (N <= 16) with an HHL circuit on the statevector simulator."""
    try:
        from qiskit import QuantumCircuit, QuantumRegister, transpile
        from qiskit.circuit.library import QFTGate, StatePreparation, UCRYGate, UnitaryGate
        from qiskit_aer import AerSimulator
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigError("the HHL circuit needs qiskit and qiskit-aer: pip install 'expertkit[quantum]'.") from exc
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    size = a.shape[0]
    if a.shape != (size, size) or b.shape != (size,) or not 1 <= size <= MAX_N:
        raise ConfigError(f"HHL here takes an N x N system with N <= {MAX_N} and b of length N; got {a.shape}, {b.shape}.")
    if not np.allclose(a, a.T):
        raise ConfigError("HHL here needs a symmetric matrix.")
    ev = np.linalg.eigvalsh(a)
    if ev[0] <= 0:
        raise ConfigError(f"HHL here needs a positive definite matrix; smallest eigenvalue {ev[0]:.3g}.")
    if not np.any(b):
        raise ConfigError("b is zero: there is no state |b> to prepare.")
    n = max(1, math.ceil(math.log2(size)))
    dim = 2**n
    ap = np.eye(dim) * ev[-1]
    ap[:size, :size] = a  # (dim, dim) padded, same κ
    bp = np.zeros(dim)
    bp[:size] = b / np.linalg.norm(b)
    m = clock_qubits
    t = 2 * math.pi * (2**m - 1) / (2**m * ev[-1])
    w, v = np.linalg.eigh(ap)
    clock, system, anc = QuantumRegister(m, "c"), QuantumRegister(n, "s"), QuantumRegister(1, "a")
    qc = QuantumCircuit(clock, system, anc)
    qc.append(StatePreparation(bp), system)
    qpe = QuantumCircuit(clock, system)
    qpe.h(clock)
    for j in range(m):
        u = (v * np.exp(1j * w * t * 2**j)) @ v.T  # (dim, dim) exp(iAt 2^j)
        qpe.append(UnitaryGate(u).control(1), [clock[j], *system])
    qpe.append(QFTGate(m).inverse(), clock)
    qc.compose(qpe, inplace=True)
    lam = 2 * math.pi * np.arange(2**m) / (2**m * t)  # eigenvalue of each clock value
    c = float(ev[0])  # C = λ_min: the ancilla amplitude C/λ <= 1 (clipped where phase estimation undershoots)
    angles = [0.0] + [2 * math.asin(min(1.0, c / lam[k])) for k in range(1, 2**m)]
    qc.append(UCRYGate(angles), [anc[0], *clock])
    qc.compose(qpe.inverse(), inplace=True)
    qc.save_statevector()
    sim = AerSimulator(method="statevector")
    sv = np.asarray(sim.run(transpile(qc, sim)).result().get_statevector())  # (2^(m+n+1),)
    idx = [(1 << (m + n)) | (s << m) for s in range(dim)]  # ancilla 1, clock 0, system s
    amp = sv[idx][:size]  # (N,)
    p = float(np.vdot(amp, amp).real)
    state = amp / math.sqrt(p) if p > 0 else amp
    if p > 0:
        k = int(np.argmax(np.abs(state)))
        state = state * np.exp(-1j * np.angle(state[k]))  # fix the global phase
    x = np.linalg.solve(a, b)
    fid = float(abs(np.vdot(x / np.linalg.norm(x), state)) ** 2) if p > 0 else 0.0
    return HHLResult(state, fid, p, float(ev[-1] / ev[0]), m + n + 1, m)
