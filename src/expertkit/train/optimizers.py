"""Pluggable optimizers for expert training.

The training loop knows nothing about how parameters are updated. It asks the
:data:`OPTIMIZERS` registry for a factory by name and calls it once::

    factory(params: list[torch.nn.Parameter], setup: OptimizerSetup) -> TrainOptimizer

``params`` are the trainable parameters (the LoRA factors); ``setup`` carries the
peak learning rate, the number of steps, the seed and the optimizer's own
hyperparameters, validated against the pydantic model registered as the
entry's ``params`` (``LoraTrainConfig.optimizer_params`` -> ``setup.hparams``).

The result follows the :class:`TrainOptimizer` protocol. Each training step calls
``step(loss_fn, lr)`` once, where ``loss_fn()`` runs the model on the current
batch and returns the **per-example** losses, shape ``(batch,)``, with the
autograd graph attached when grad mode is on. The optimizer decides what to do
with it:

* first-order methods (``adamw``, ``sgd``): ``loss_fn().mean().backward()``, clip, step;
* zeroth-order methods: call ``loss_fn()`` under ``torch.no_grad()`` at perturbed
  parameters and update from the loss differences;
* differentially private methods: per-example gradients from the per-example losses,
  clipped and noised.

Optional hooks the loop calls when an optimizer defines them: ``batch_indices(step, pool)``
picks the pool indices of a step's batch (DP-SGD's Poisson sampling; it may be empty, and then
``loss_fn()`` returns an empty tensor), ``report()`` returns a JSON-able dict recorded in the
output's metadata (e.g. the privacy spent) and ``close()`` is called when training ends.

``step`` returns the batch loss (a float, for the progress bar and the log). Its
``state_dict()`` / ``load_state_dict()`` must round-trip everything needed to make a
resumed run identical to an uninterrupted one; values may be tensors, numbers,
strings, ``None``, and dicts (any keys), lists and tuples of these. Randomness
should come from the torch global RNG (saved and restored by checkpoints) or be
derived from ``setup.seed`` and the step.

To add a method, register it in its own module; no other file changes::

    @OPTIMIZERS.register("my-zo", summary="...", paper="...", params=MyParams)
    def my_zo(params, setup): return MyZO(params, setup)

Names not yet registered are looked up again after importing
:data:`PLUGIN_PACKAGES`, whose ``__init__`` imports their methods.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, Field

from expertkit.config import Config, validate
from expertkit.registry import Registry

LossFn = Callable[[], torch.Tensor]  # () -> (batch,) per-example losses
#: Packages imported (when present) before an unknown optimizer name is refused.
PLUGIN_PACKAGES = ("expertkit.optim", "expertkit.privacy", "expertkit.federated")


@runtime_checkable
class TrainOptimizer(Protocol):
    """What the training loop needs from an optimizer (see the module docstring)."""

    def step(self, loss_fn: LossFn, lr: float) -> float:
        """Make one update at learning rate ``lr``; return the batch loss."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically after a restart."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


@dataclass(frozen=True)
class OptimizerSetup:
    """What a factory gets besides the parameters."""

    lr: float  # peak learning rate (each step passes the scheduled one)
    steps: int
    seed: int
    hparams: BaseModel  # validated instance of the entry's params model
    names: tuple[str, ...] | None = None  # parameter names, aligned with params (block-wise, hybrid)
    model: Any = None  # the module the parameters belong to (forward-mode methods need it)
    pool_size: int | None = None  # training examples the batches are drawn from (DP: the private set's n)
    batch_size: int | None = None  # examples per step (DP: the expected batch size)


OptimizerFactory = Callable[[list[torch.nn.Parameter], OptimizerSetup], TrainOptimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


class TorchOptimizer:
    """A first-order ``torch.optim`` optimizer behind the :class:`TrainOptimizer` protocol.

    Each step: zero the grads, backpropagate the mean per-example loss, clip the
    global grad norm to ``max_grad_norm`` (when set), set ``lr`` on every group, step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> None:
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(self, loss_fn: LossFn, lr: float) -> float:
        """Backpropagate ``loss_fn().mean()`` and update at ``lr``; return the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn().mean()  # () mean over examples
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the wrapped optimizer's state."""
        self.optimizer.load_state_dict(state)


class AdamWParams(Config):
    """Hyperparameters of ``adamw``."""

    betas: tuple[float, float] = Field((0.9, 0.999), description="moment decay rates")
    eps: float = Field(1e-8, gt=0, description="denominator epsilon")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global grad norm (None = no clipping)")


class SGDParams(Config):
    """Hyperparameters of ``sgd``."""

    momentum: float = Field(0.0, ge=0, lt=1, description="momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0)")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global grad norm (None = no clipping)")


@OPTIMIZERS.register(
    "adamw", summary="AdamW with global grad-norm clipping", params=AdamWParams,
    paper="Loshchilov & Hutter, Decoupled Weight Decay Regularization (ICLR 2019)",
)
def adamw(params: list[torch.nn.Parameter], setup: OptimizerSetup) -> TrainOptimizer:
    """AdamW over ``params`` (``setup.hparams``: :class:`AdamWParams`)."""
    hp: AdamWParams = setup.hparams  # type: ignore[assignment]
    opt = torch.optim.AdamW(params, lr=setup.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay)
    return TorchOptimizer(opt, hp.max_grad_norm)


@OPTIMIZERS.register("sgd", summary="SGD (optionally with momentum) with grad-norm clipping", params=SGDParams)
def sgd(params: list[torch.nn.Parameter], setup: OptimizerSetup) -> TrainOptimizer:
    """SGD over ``params`` (``setup.hparams``: :class:`SGDParams`)."""
    hp: SGDParams = setup.hparams  # type: ignore[assignment]
    opt = torch.optim.SGD(
        params, lr=setup.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
    )
    return TorchOptimizer(opt, hp.max_grad_norm)


def _load_plugins() -> dict[str, str]:
    """Import :data:`PLUGIN_PACKAGES` (their ``__init__`` registers their optimizers).

    Returns ``{package: missing third-party module}`` for a plugin package that could not be
    imported because an optional dependency is not installed. Any other import failure (a
    plugin module that is broken, a missing expertkit module) is raised as it is: it must not
    pass for an unknown optimizer name.
    """
    missing: dict[str, str] = {}
    for pkg in PLUGIN_PACKAGES:
        try:
            importlib.import_module(pkg)
        except ModuleNotFoundError as exc:
            name = exc.name or ""
            ours = name == "expertkit" or name.startswith("expertkit.") or pkg.startswith(name + ".") or name == pkg
            if not name or ours:
                raise
            missing[pkg] = name.split(".")[0]
    return missing


def optimizer_entry(name: str) -> Any:
    """The registry entry of optimizer ``name``; unknown names raise with a suggestion (and name
    the missing package of a plugin that could not be loaded)."""
    if name not in OPTIMIZERS:
        missing = _load_plugins()
        if name not in OPTIMIZERS and missing:
            from expertkit.errors import unknown

            err = unknown("optimizer", name, OPTIMIZERS.names())
            note = "; ".join(f"{pkg} needs the package '{dep}', which is not installed"
                             for pkg, dep in missing.items())
            raise type(err)(f"{err} Not loaded: {note}.") from None
    return OPTIMIZERS.entry(name)


def build_optimizer(
    name: str,
    params: list[torch.nn.Parameter],
    *,
    lr: float,
    steps: int,
    seed: int,
    hparams: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
    model: Any = None,
    pool_size: int | None = None,
    batch_size: int | None = None,
) -> TrainOptimizer:
    """Build optimizer ``name`` over ``params``; ``hparams`` are validated against its params model.

    ``names`` (aligned with ``params``) and ``model`` are passed on for methods that need them
    (block-wise and hybrid zeroth-order training, forward-mode gradients); ``pool_size`` and
    ``batch_size`` for methods that sample their own batches (DP-SGD).
    """
    entry = optimizer_entry(name)
    params_model = entry.params or Config
    checked = validate(params_model, dict(hparams or {}), source=f"optimizer '{name}' parameters")
    setup = OptimizerSetup(lr=lr, steps=steps, seed=seed, hparams=checked,
                           names=tuple(names) if names is not None else None, model=model,
                           pool_size=pool_size, batch_size=batch_size)
    return entry.obj(list(params), setup)
