"""Task arithmetic: add the (weighted) sum of task vectors to the base.

Semantics, per tensor: ``out = base + lambda * sum_i w_i (theta_i - base)``; with ``normalize``
the sum is divided by ``sum_i w_i`` first (off by default). Weights default to 1. Needs a base.
Same semantics and defaults as mergekit's ``task_arithmetic`` (whose ``weight`` has no default).
"""

from __future__ import annotations

import torch
from pydantic import AliasChoices, Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, if_normalize, merge_method, weighted_sum


class TaskArithmeticParams(MethodParams):
    """Parameters of ``task_arithmetic``."""

    lambda_: float = Field(1.0, validation_alias=AliasChoices("lambda", "scaling", "lambda_"),
                           serialization_alias="lambda", description="scale of the summed task vector")
    normalize: bool = Field(False, description="divide the sum of task vectors by the sum of the weights")


@merge_method("task_arithmetic", params=TaskArithmeticParams, needs_base=True, normaliser=if_normalize("total"),
              vs_mergekit="equal (1e-6)",
              paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
              summary="base + lambda * sum of weighted task vectors")
def task_arithmetic(x: TensorInputs) -> torch.Tensor:
    """``base + lambda * sum_i w_i (theta_i - base)`` (divided by ``sum_i w_i`` when ``normalize``)."""
    mixed = weighted_sum(x.deltas(), x.weights, x.params.normalize, inplace=True)
    return mixed.mul_(x.params.lambda_).add_(x.base.to(x.work_dtype))
