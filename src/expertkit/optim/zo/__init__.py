"""Zeroth-order fine-tuning (ZO-Bench): LLM fine-tuning at inference memory.

Importing this package registers the methods in ``expertkit.train.OPTIMIZERS``:
``zo-sgd`` (MeZO), ``zo-sgd-sign``, ``zo-sgd-scalar-sign`` (what ZO-Bench's code runs as
ZO-SGD-Sign), ``zo-sgd-mmt``, ``zo-sgd-cons``, ``zo-adam`` and ``forward-grad``. Every one
accepts the shared :class:`ZOParams` (ε, q, one/two-sided, block-wise, sparsity, hybrid).

* :class:`ZOEngine`: seeded in-place perturbations, exact undo, replay of directions.
* :class:`ZOMethod`: the training step (a ``TrainOptimizer`` for ``train_lora(optimizer=...)``).
* :class:`ZOOptimizer`: the same methods as a ``torch.optim.Optimizer`` with ``step(closure)``.
* :func:`zo_defaults`: lr and ε per fine-tuning scheme (MeZO/ZO-Bench grids).
"""

from expertkit.optim.zo import adam, conservative, forward_grad, momentum, scalar_sign, sgd, sign  # noqa: F401
from expertkit.optim.zo.base import ZOMethod
from expertkit.optim.zo.defaults import ZO_DEFAULTS, grid, zo_defaults
from expertkit.optim.zo.engine import ZOEngine, derive_seed
from expertkit.optim.zo.params import ZOParams
from expertkit.optim.zo.sparsity import select_coordinates
from expertkit.optim.zo.torch_optim import ZOOptimizer

ZO_METHODS = ("zo-sgd", "zo-sgd-sign", "zo-sgd-scalar-sign", "zo-sgd-mmt", "zo-sgd-cons", "zo-adam", "forward-grad")

__all__ = [
    "ZO_DEFAULTS", "ZO_METHODS", "ZOEngine", "ZOMethod", "ZOOptimizer", "ZOParams",
    "derive_seed", "grid", "select_coordinates", "zo_defaults",
]
