"""A 10-parameter quadratic with a known gradient, shared by the zeroth-order tests."""

from __future__ import annotations

from typing import Any

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor (so -0.0 != 0.0 and NaNs compare by payload)."""
    t = t.detach().contiguous()
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}[t.dtype])


class Quadratic(torch.nn.Module):
    """``f(θ) = ½ θᵀAθ + bᵀθ`` in float64, A positive definite, ``∇f = Aθ + b``."""

    def __init__(self, n: int = 10, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        m = torch.randn(n, n, generator=gen, dtype=torch.float64)
        self.A = m @ m.T / n + torch.eye(n, dtype=torch.float64)
        self.b = torch.randn(n, generator=gen, dtype=torch.float64)
        self.theta = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))

    def f(self, theta: torch.Tensor) -> torch.Tensor:
        """The loss at ``theta``."""
        return 0.5 * theta @ self.A @ theta + self.b @ theta

    def forward(self) -> torch.Tensor:
        """The loss at the current parameter, shape ``(1,)`` (a batch of one)."""
        return self.f(self.theta).reshape(1)

    def loss_fn(self) -> torch.Tensor:
        """Closure for optimizers."""
        return self()

    def gradient(self) -> torch.Tensor:
        """The true gradient at the current parameter."""
        return (self.A @ self.theta + self.b).detach()

    def loss_value(self, method: Any) -> Any:
        """A float-valued loss closure like the one a method builds in ``step``."""

        def loss() -> float:
            with torch.no_grad():
                return float(self())

        return loss
