"""``ZOOptimizer``: any registered zeroth-order method as a ``torch.optim.Optimizer``.

    opt = ZOOptimizer(model.named_parameters(), method="zo-sgd", lr=1e-6, eps=1e-3)
    for batch in data:
        loss = opt.step(lambda: model(**batch).loss)   # the closure returns the loss; no backward

The closure is called under ``torch.no_grad()`` at perturbed parameters (twice per query for
two-point estimators) and must not call ``backward``. Pass named parameters (or ``names=``)
for block-wise and hybrid training, and ``model=`` for ``forward-grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from expertkit.errors import ConfigError


class ZOOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose ``step(closure)`` runs one zeroth-order step of ``method``.

    Args:
        params: parameters, or ``(name, parameter)`` pairs such as ``model.named_parameters()``
            (only those with ``requires_grad`` are trained).
        method: a zeroth-order name from ``expertkit.train.OPTIMIZERS`` (``zo-sgd``, ``zo-adam``, ...).
        lr: learning rate (read from ``param_groups[0]["lr"]`` at every step, so LR schedulers work).
        seed: seed of the directions.
        names: parameter names when ``params`` are plain tensors.
        model: the module (needed by ``forward-grad``).
        **hparams: the method's hyperparameters (``eps``, ``q``, ``block``, ``sparsity``, ...).
    """

    def __init__(
        self, params: Iterable[Any], method: str = "zo-sgd", lr: float = 1e-6, *, seed: int = 0,
        names: list[str] | None = None, model: torch.nn.Module | None = None, **hparams: Any,
    ) -> None:
        from expertkit.train.optimizers import build_optimizer, optimizer_entry

        items = list(params)
        if items and isinstance(items[0], tuple):
            names = [n for n, p in items if p.requires_grad]
            items = [p for _, p in items if p.requires_grad]
        if not optimizer_entry(method).extra.get("zo"):
            raise ConfigError(f"'{method}' is not a zeroth-order method; use torch.optim for first-order ones.")
        super().__init__(items, {"lr": lr})
        self.method = build_optimizer(method, items, lr=lr, steps=0, seed=seed, hparams=hparams,
                                      names=names, model=model)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One step; ``closure()`` returns the loss (a scalar or per-example losses). Returns the loss."""
        if closure is None:
            raise ConfigError("a zeroth-order optimizer needs step(closure): the closure returns the loss.")
        lrs = {g["lr"] for g in self.param_groups}
        if len(lrs) != 1:
            raise ConfigError("ZOOptimizer supports one learning rate for all parameter groups.")
        return torch.tensor(self.method.step(closure, lrs.pop()))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to zero: zeroth-order steps make no gradients (hybrid FO grads are cleared by the step)."""

    def state_dict(self) -> dict[str, Any]:
        """The method's state and the learning rate."""
        return {"method": self.method.state_dict(), "lr": self.param_groups[0]["lr"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result."""
        self.method.load_state_dict(state_dict["method"])
        for g in self.param_groups:
            g["lr"] = state_dict["lr"]
