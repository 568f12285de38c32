"""DP-SGD behind the training loop's optimizer protocol, on Opacus.

:class:`PrivateOptimizer` wraps a ``torch.optim`` optimizer (convention 6: DP wraps an optimizer):

* per-example gradients by Opacus's ``GradSampleModule`` (hooks; functorch for layers without a
  registered grad sampler), attached to the model the loop trains, i.e. *after* PEFT has created
  its adapter parameters (Opacus issue 820: hooks attached earlier miss the LoRA layers and the
  adapter silently never trains; the tests check that trained weights change);
* clipping to ``max_grad_norm``, Gaussian noise of std ``noise_multiplier * max_grad_norm`` and
  division by the expected batch size by Opacus's ``DPOptimizer``;
* accounting by Opacus's RDP or PRV accountant, stepped by ``DPOptimizer``'s step hook;
* Poisson sampling: each step takes every private example independently with probability
  q = batch_size / n, as Opacus's ``UniformWithReplacementSampler`` does (it is called here with a
  generator seeded by (seed, step), so the batch is a pure function of the step and a resumed run
  draws the same batches). The accountants assume exactly this sampling.

A step is two phases, so that DP-Flat's wrappers can act between them: :meth:`private_gradient`
leaves the privatised mean gradient in ``p.grad`` (one query, charged to the accountant), and
:meth:`apply` makes the wrapped optimizer's update. Masks (sparse prefix) zero per-example
gradients outside the trained coordinates before clipping and the noise outside them after.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from expertkit.privacy.accounting import calibrate, check_setting, epsilon_spent, make_accountant


class PrivateOptimizer:
    """DP-SGD over ``params`` of ``model`` with a wrapped torch optimizer (see the module docstring)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, pool_size: int, batch_size: int,
        steps: int, seed: int, delta: float, max_grad_norm: float, epsilon: float | None = None,
        noise_multiplier: float | None = None, accountant: str = "rdp",
        masks: dict[torch.nn.Parameter, torch.Tensor] | None = None,
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.sample_rate = batch_size / pool_size
        check_setting(delta=delta, sample_rate=self.sample_rate, pool_size=pool_size)
        if noise_multiplier is None:
            noise_multiplier = calibrate(math.inf if epsilon is None else epsilon, delta, self.sample_rate,
                                         steps, accountant)
        self.target_epsilon, self.delta, self.steps, self.seed = epsilon, delta, steps, seed
        self.pool_size, self.batch_size, self.accountant_name = pool_size, batch_size, accountant
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.masks = dict(masks or {})
        # strict=False: transformer blocks hold buffers (rotary inv_freq) that mix no examples
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
        self.dp = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                              expected_batch_size=batch_size, loss_reduction="mean")
        self.accountant = make_accountant(accountant)
        self.dp.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        self._last_loss = 0.0

    @property
    def noise_multiplier(self) -> float:
        """σ: the noise std divided by the clipping norm."""
        return float(self.dp.noise_multiplier)

    def batch_indices(self, step: int, pool: int) -> list[int]:
        """The Poisson batch of 0-based ``step``: each index in ``range(pool)`` with probability q."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 7_919)
        sampler = UniformWithReplacementSampler(num_samples=pool, sample_rate=self.sample_rate, generator=gen, steps=1)
        return [int(i) for i in next(iter(sampler))]

    def private_gradient(self, loss_fn: Any) -> float:
        """Per-example gradients of ``loss_fn()``, clipped, summed, noised, averaged into ``p.grad``."""
        self.dp.zero_grad(set_to_none=True)
        losses = loss_fn()  # (batch,) per-example losses, possibly (0,) for an empty Poisson batch
        if losses.numel():
            with warnings.catch_warnings():  # the first hooked layer's input needs no grad: harmless
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()  # GradSampleModule(loss_reduction="sum"): grad_sample[i] = grad of loss i
            self._last_loss = float(losses.detach().mean())
        else:
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))  # (0, *shape): Opacus adds the noise alone
        for p, mask in self.masks.items():
            p.grad_sample = p.grad_sample * mask  # (batch, *shape): untrained coordinates spend no norm
        self.dp.pre_step()  # clip, sum, noise, / expected batch; steps the accountant
        for p, mask in self.masks.items():
            p.grad = p.grad * mask  # noise only on trained coordinates
        return self._last_loss

    def apply(self, lr: float) -> None:
        """The wrapped optimizer's update at ``lr`` from the privatised ``p.grad``."""
        for group in self.dp.original_optimizer.param_groups:
            group["lr"] = lr
        self.dp.original_optimizer.step()

    def step(self, loss_fn: Any, lr: float) -> float:
        """One DP-SGD step; returns the batch loss (the previous one for an empty batch)."""
        loss = self.private_gradient(loss_fn)
        self.apply(lr)
        return loss

    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (∞ without noise)."""
        if self.noise_multiplier == 0:
            return math.inf if self.accountant.history else 0.0
        return float(self.accountant.get_epsilon(delta=self.delta)) if self.accountant.history else 0.0

    def report(self) -> dict[str, Any]:
        """What was spent: ε, δ, σ, q, steps, the accountant (recorded in ``expertkit.json``)."""
        steps = sum(int(n) for _, _, n in self.accountant.history)
        return {
            "epsilon": self.epsilon(), "target_epsilon": self.target_epsilon, "delta": self.delta,
            "noise_multiplier": self.noise_multiplier, "max_grad_norm": float(self.dp.max_grad_norm),
            "sample_rate": self.sample_rate, "steps": steps, "accountant": self.accountant_name,
            "private_examples": self.pool_size, "expected_batch_size": self.batch_size,
        }

    def planned_epsilon(self) -> float:
        """ε the whole run will have spent after ``steps`` steps."""
        return epsilon_spent(self.noise_multiplier, self.sample_rate, self.steps, self.delta, self.accountant_name)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the accountant's history and the last loss."""
        history = [[float(s), float(q), int(n)] for s, q, n in self.accountant.history]
        return {"optimizer": self.dp.original_optimizer.state_dict(), "history": history, "last_loss": self._last_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.dp.original_optimizer.load_state_dict(state["optimizer"])
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self._last_loss = float(state["last_loss"])

    def close(self) -> None:
        """Remove the per-example-gradient hooks and attributes from the model."""
        self.gsm.remove_hooks()
        for p in self.params:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
