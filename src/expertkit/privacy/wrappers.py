"""DP-Flat's weight-level parts as wrappers around :class:`~expertkit.privacy.dp.PrivateOptimizer`.

Each wrapper has the same two-phase interface as the optimizer it wraps (``private_gradient``,
``apply``, ``step``), so they compose in any number: ``WeightDistillation(WeightPerturbation(dp))``.

* :class:`WeightPerturbation` (SAM / AWP under DP): the gradient of a step is taken at
  ``w + rho * g / |g|``, where ``g`` is the **previous step's privatised gradient** (clipped,
  noised, averaged). It never reads a per-example or a clipped-but-unnoised gradient, so the
  perturbation is post-processing of already-released quantities: no extra privacy cost, one
  query per step (the choice of Park et al., "Differentially Private Sharpness-Aware Training",
  ICML 2023). The first step, with no released gradient yet, is unperturbed.
* :class:`WeightDistillation`: adds ``distill_weight * (w - w_teacher)`` to the privatised gradient,
  the gradient of ``distill_weight / 2 * |w - w_teacher|^2``: a pull towards the weights of a non-DP
  teacher. The term depends on no private example (the teacher trained on public data only), so
  it is post-processing too and costs no privacy.
"""

from __future__ import annotations

from typing import Any

import torch


class _Wrapper:
    """Forwards everything but the gradient phase to the wrapped optimizer."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.params: list[torch.nn.Parameter] = inner.params

    def __getattr__(self, name: str) -> Any:  # batch_indices, report, close, epsilon, noise_multiplier ...
        return getattr(self.inner, name)

    def apply(self, lr: float) -> None:
        """The wrapped optimizer's update."""
        self.inner.apply(lr)

    def step(self, loss_fn: Any, lr: float) -> float:
        """Privatised gradient (with this wrapper's part), then the update."""
        loss = self.private_gradient(loss_fn)
        self.apply(lr)
        return loss

    def private_gradient(self, loss_fn: Any) -> float:  # pragma: no cover - overridden
        """The privatised gradient, into ``p.grad``."""
        raise NotImplementedError

    def own_state(self) -> dict[str, Any]:
        """This wrapper's own resumable state."""
        return {}

    def load_own_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`own_state`."""

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state with this wrapper's."""
        return {"inner": self.inner.state_dict(), "own": self.own_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.inner.load_state_dict(state["inner"])
        self.load_own_state(state["own"])


class WeightPerturbation(_Wrapper):
    """Ascent to ``w + rho * g_prev / |g_prev|`` before each privatised gradient (see module docstring)."""

    def __init__(self, inner: Any, rho: float) -> None:
        super().__init__(inner)
        self.rho = rho
        self.direction: list[torch.Tensor] | None = None  # last released (privatised) gradient
        self.last_perturbation: list[torch.Tensor] | None = None  # what the last step added (tests read it)

    def perturbation(self) -> list[torch.Tensor] | None:
        """``rho * g_prev / |g_prev|`` from the last privatised gradient only (None before the first)."""
        if self.direction is None:
            return None
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in self.direction)).float()  # () global norm
        if norm == 0:
            return None
        return [self.rho * d / norm for d in self.direction]

    def private_gradient(self, loss_fn: Any) -> float:
        """The privatised gradient at the perturbed weights; the weights are restored afterwards."""
        deltas = self.perturbation()
        self.last_perturbation = deltas
        if deltas is not None:
            with torch.no_grad():
                for p, d in zip(self.params, deltas, strict=True):
                    p.add_(d)
        try:
            loss = self.inner.private_gradient(loss_fn)
        finally:
            if deltas is not None:
                with torch.no_grad():
                    for p, d in zip(self.params, deltas, strict=True):
                        p.sub_(d)
        self.direction = [p.grad.detach().clone() for p in self.params]  # released: post-processing only
        return loss

    def own_state(self) -> dict[str, Any]:
        """The last privatised gradient (the next step's direction)."""
        return {"direction": self.direction}

    def load_own_state(self, state: dict[str, Any]) -> None:
        """Restore the direction."""
        d = state["direction"]
        self.direction = None if d is None else [t.clone() for t in d]


class WeightDistillation(_Wrapper):
    """Adds ``weight * (w - w_teacher)`` to the privatised gradient (see module docstring)."""

    def __init__(self, inner: Any, teacher: list[torch.Tensor], weight: float) -> None:
        super().__init__(inner)
        if len(teacher) != len(self.params) or any(t.shape != p.shape for t, p in zip(teacher, self.params)):
            from expertkit.errors import IncompatibleModelsError

            raise IncompatibleModelsError(
                "the teacher's trained tensors do not match the student's (another scheme, rank or model?); "
                "train the teacher with the same scheme and settings on the public data."
            )
        self.teacher = [t.detach().to(p.dtype).clone() for t, p in zip(teacher, self.params)]
        self.weight = weight

    def private_gradient(self, loss_fn: Any) -> float:
        """The wrapped privatised gradient plus the pull towards the teacher."""
        loss = self.inner.private_gradient(loss_fn)
        with torch.no_grad():
            for p, t in zip(self.params, self.teacher, strict=True):
                mask = getattr(self.inner, "masks", {}).get(p)
                pull = self.weight * (p - t)  # same shape as p
                p.grad.add_(pull if mask is None else pull * mask)
        return loss
