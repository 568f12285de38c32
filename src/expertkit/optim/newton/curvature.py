"""Curvature of a loss per block of parameters, as curvlinops linear operators.

Two ways in:

* a **closure** (what the training loop passes every optimizer): ``loss_fn()`` returns the
  per-example losses ``(batch,)`` of the model at its current parameters.
  :func:`closure_problem` wraps it in a module whose "prediction" is the per-example loss
  vector and whose loss is its mean, so that curvlinops' functional calls swap the block's
  parameters inside the model. Available: the Hessian and the empirical Fisher (the latter
  from curvlinops' transposed Jacobian of the per-example losses: ``F = Jᵀ J / B``). The
  generalized Gauss-Newton needs the model's outputs, which a closure does not expose.
* a **problem** (:class:`Problem`): a model, a loss module (``MSELoss``, ``CrossEntropyLoss``,
  ``BCEWithLogitsLoss``) and a batch ``(X, y)``: Hessian, GGN and empirical Fisher.

:func:`dense_matrix` materialises a small block's operator (``n`` products, in column chunks);
larger blocks stay matrix-free and are reached through :func:`numpy_matvec`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from expertkit.errors import ConfigError

CURVATURES = ("hessian", "ggn", "fisher")


class _PerExampleLoss(torch.nn.Module):
    """``forward(X) -> loss_fn()``: the per-example losses ``(B,)`` (``X`` only sets the batch size)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], rng: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn
        self._rng = rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-example losses ``(B,)``; every call sees the same dropout draw."""
        torch.set_rng_state(self._rng)
        return self._loss_fn().reshape(-1)  # (B,)


class _Mean(torch.nn.Module):
    """The criterion of a closure problem: the mean of the per-example losses."""

    reduction = "sum"  # curvlinops: one batch, no further normalisation

    def forward(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``mean(pred)``; ``y`` is unused."""
        return pred.mean()


@dataclass
class Problem:
    """A model, its loss module and one batch ``(X, y)``; ``closure`` marks a wrapped loss_fn."""

    model: torch.nn.Module
    loss_func: torch.nn.Module
    X: torch.Tensor
    y: torch.Tensor
    closure: bool = False

    @property
    def batch(self) -> int:
        """Examples in the batch."""
        return int(self.X.shape[0])

    def loss(self) -> torch.Tensor:
        """The batch loss (a scalar, with the autograd graph)."""
        return self.loss_func(self.model(self.X), self.y)


def closure_problem(
    model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], batch: int, rng: torch.Tensor,
) -> Problem:
    """A :class:`Problem` around a training-loop closure over ``batch`` examples (see the module doc).

    ``rng`` is the torch RNG state every evaluation starts from (the same dropout draw each time).
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError("Newton optimizers need the model the parameters belong to; build them with model=...")
    X = torch.zeros(batch, 1)  # (B, 1) placeholder input
    return Problem(_PerExampleLoss(model, loss_fn, rng), _Mean(), X, torch.zeros(batch), closure=True)


def operator(kind: str, problem: Problem, params: Sequence[torch.nn.Parameter]) -> Any:
    """The curvlinops operator of curvature ``kind`` over ``params`` (shape ``(n, n)``)."""
    import curvlinops

    data = [(problem.X, problem.y)]
    kw: dict[str, Any] = {"check_deterministic": False, "num_data": problem.batch}
    if kind == "hessian":
        return curvlinops.HessianLinearOperator(problem.model, problem.loss_func, list(params), data, **kw)
    if kind == "ggn":
        if problem.closure:
            raise ConfigError(
                "curvature 'ggn' needs the model's outputs and a loss module; the training loop passes "
                "per-example losses only: use curvature 'hessian' or 'fisher' there, or NewtonOptimizer.step_problem."
            )
        return curvlinops.GGNLinearOperator(problem.model, problem.loss_func, list(params), data, **kw)
    if kind == "fisher":
        if problem.closure:
            return JacobianFisher(closure_jacobian(problem, params), problem.batch)
        return curvlinops.EFLinearOperator(problem.model, problem.loss_func, list(params), data, **kw)
    raise ConfigError(f"unknown curvature '{kind}'; choose one of {', '.join(CURVATURES)}.")


def closure_jacobian(problem: Problem, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """``Jᵀ``, ``(n, B)``: column i is the gradient of example i's loss (curvlinops, one pass)."""
    import curvlinops

    b = problem.batch
    jt = curvlinops.TransposedJacobianLinearOperator(
        problem.model, list(params), [(problem.X, problem.y)], check_deterministic=False, num_data=b,
    )
    return (jt @ torch.eye(b, dtype=params[0].dtype)).detach()  # (n, B)


class JacobianFisher:
    """Empirical Fisher ``Jᵀ J / B`` from a materialised ``Jᵀ`` ``(n, B)`` (one slice per block)."""

    def __init__(self, jt: torch.Tensor, batch: int) -> None:
        self.jt, self.batch = jt, batch
        self.shape = (jt.shape[0], jt.shape[0])
        self.dtype = jt.dtype

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.jt @ (self.jt.T @ v) / self.batch  # (n,) or (n, K)

    def dense(self) -> torch.Tensor:
        """The ``(n, n)`` matrix, float64."""
        j = self.jt.double()
        return j @ j.T / self.batch


@contextlib.contextmanager
def forward_ad_friendly() -> Iterator[None]:
    """Evaluate curvature with ops that have forward-mode derivatives (Hessian-vector products are
    forward-over-reverse in curvlinops): ``F.silu`` is computed as ``x * sigmoid(x)`` (torch 2.13 has no
    forward derivative for ``silu_backward``). Callers also pick the math attention kernel
    (``sdpa_kernel([SDPBackend.MATH])``), whose ops all have one. Values are unchanged."""
    original = F.silu

    def silu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return x * torch.sigmoid(x)

    F.silu = silu
    try:
        yield
    finally:
        F.silu = original


def _op_dtype(op: Any) -> torch.dtype:
    return op.dtype if isinstance(op.dtype, torch.dtype) else torch.float32


def dense_matrix(op: Any, chunk: int = 128) -> torch.Tensor:
    """The symmetric ``(n, n)`` float64 matrix of operator ``op`` (``n`` products in chunks)."""
    if hasattr(op, "dense"):
        m = op.dense()
    else:
        n = op.shape[1]
        dt = _op_dtype(op)
        cols = []
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            e = torch.zeros(n, stop - start, dtype=dt)  # (n, c) unit columns
            e[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append((op @ e).detach().double())  # (n, c)
        m = torch.cat(cols, dim=1)  # (n, n)
    return 0.5 * (m + m.T)


def numpy_matvec(op: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``v -> op @ v`` on float64 numpy vectors ``(n,)`` (computed in the operator's dtype)."""
    dt = _op_dtype(op)

    def mv(v: np.ndarray) -> np.ndarray:
        out = op @ torch.from_numpy(np.ascontiguousarray(v)).to(dt)  # (n,)
        return out.detach().double().numpy()

    return mv
