"""Forward-Grad: the exact directional derivative ``g = ∇L·z`` by forward-mode AD (``torch.func.jvp``).

No finite difference: one jvp per direction gives ``g`` exactly, and the update is ZO-SGD's
``θ -= lr * g z``. The tangents are dense, so memory is about one copy of the trainable
parameters plus forward-mode activations (ZO-Bench: more than ZO-SGD, far less than back-prop).
Needs the model (``setup.model``) and the parameter names; attention runs in its ``eager``
implementation during the jvp (PyTorch's fused CPU attention has no forward-mode rule).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import functional_call, jvp

from expertkit.errors import ConfigError
from expertkit.optim.zo.base import Loss, ZOMethod, register


class _Call(torch.nn.Module):
    """Holds the model so ``functional_call`` can swap its parameters around a closure."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``fn`` (which calls the held model) and return its mean loss."""
        out = fn()
        return (out.float() if out.dtype in (torch.float16, torch.bfloat16) else out).mean()


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Switch a transformers model to eager attention for the duration (forward-mode AD needs it)."""
    setter = getattr(model, "set_attn_implementation", None)
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if setter is None or before in (None, "eager"):
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(before)


def directional_derivative(
    model: torch.nn.Module, names: list[str], tangents: dict[str, torch.Tensor], loss_fn: Callable[[], torch.Tensor],
) -> tuple[float, float]:
    """``(L(θ), ∇L(θ)·v)`` by one jvp; ``tangents`` maps parameter names to the direction ``v``."""
    call = _Call(model)
    own = dict(model.named_parameters())
    primals = tuple(own[n].detach() for n in names)
    tans = tuple(tangents[n] for n in names)

    def f(*xs: torch.Tensor) -> torch.Tensor:
        return functional_call(call, {f"m.{n}": x for n, x in zip(names, xs, strict=True)}, (loss_fn,), strict=False)

    with eager_attention(model), torch.no_grad():
        value, deriv = jvp(f, primals, tans)
    return float(value), float(deriv)


@register("forward-grad", summary="Forward-Grad: exact directional derivative by forward-mode AD (jvp)",
          paper="Baydin et al., Gradients without Backpropagation (2022); ZO-Bench (ICML 2024)")
class ForwardGrad(ZOMethod):
    """``g_j = ∇L·z_j`` from a jvp (``eps`` and ``estimator`` are not used)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if self.model is None or self.names is None:
            raise ConfigError("forward-grad needs the model and the parameter names (OptimizerSetup.model/names, "
                              "or ZOOptimizer(..., model=model) with named parameters).")

    def estimate(
        self, ids: list[int], seeds: list[int], loss: Loss, loss_fn: Callable[[], torch.Tensor],
    ) -> tuple[list[float], float]:
        """One jvp per seed along the (masked) direction ``z``."""
        names = [self.names[i] for i in ids]
        grads, values = [], []
        for s in seeds:
            tangents = {self.names[i]: self.engine.dense(i, self.engine.direction(i, s)) for i in ids}
            value = self._jvp(names, tangents, loss, loss_fn)
            grads.append(value[1])
            values.append(value[0])
        return grads, sum(values) / len(values)

    def _jvp(self, names: list[str], tangents: dict[str, torch.Tensor], loss: Loss,
             loss_fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
        loss_rewound = _Rewind(loss_fn, loss)
        self.forwards += 1
        return directional_derivative(self.model, names, tangents, loss_rewound)


class _Rewind:
    """``loss_fn`` preceded by the step's RNG rewind (same dropout as the other forwards)."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], loss: Loss) -> None:
        self.loss_fn = loss_fn
        self.rng = getattr(loss, "rng", None)

    def __call__(self) -> torch.Tensor:
        if self.rng is not None:
            torch.set_rng_state(self.rng)
        return self.loss_fn()
