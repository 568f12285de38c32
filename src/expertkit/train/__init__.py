"""Expert training: LoRA experts on a task, with pluggable optimizers.

* :func:`train_lora` / :class:`LoraTrainConfig` / :class:`TrainResult`: train one LoRA expert
  (seeded, resumable, written atomically as a PEFT adapter folder plus ``expertkit.json``).
* :data:`OPTIMIZERS`: the optimizer registry (``adamw``, ``sgd``); see
  :mod:`expertkit.train.optimizers` for the :class:`TrainOptimizer` protocol that
  zeroth-order, DP and federated methods implement to plug in.
"""

from expertkit.train.config import LoraTrainConfig
from expertkit.train.lora import StepInfo, TrainResult, train_lora
from expertkit.train.optimizers import (
    OPTIMIZERS,
    OptimizerSetup,
    TorchOptimizer,
    TrainOptimizer,
    build_optimizer,
)

__all__ = [
    "OPTIMIZERS",
    "LoraTrainConfig",
    "OptimizerSetup",
    "StepInfo",
    "TorchOptimizer",
    "TrainOptimizer",
    "TrainResult",
    "build_optimizer",
    "train_lora",
]
