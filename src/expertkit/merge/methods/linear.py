"""Linear merge: the weighted average of the input models ("model soups").

Semantics, per tensor: ``out = sum_i w_i * theta_i``, divided by ``sum_i w_i`` when
``normalize`` (default); weights whose sum is near 0 are refused before any work
(:func:`expertkit.merge.core.check_weights`). Weights default to 1, so the
default is the plain mean. The base model, if given, is **not** an input (list it among the
models to include it), as in mergekit. Same semantics as mergekit's ``linear``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, if_normalize, merge_method, weighted_sum
from expertkit.merge.methods.blockwise import blockwise


class LinearParams(MethodParams):
    """Parameters of ``linear``."""

    normalize: bool = Field(True, description="divide by the sum of the weights")


@merge_method("linear", params=LinearParams, paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
              summary="weighted average of the models", zero_copy=True, normaliser=if_normalize("total"),
              vs_mergekit="equal, bit for bit")
def linear(x: TensorInputs) -> torch.Tensor:
    """``sum_i w_i theta_i / sum_i w_i`` (without the division when ``normalize`` is false), block by
    block into a tensor of the output dtype (the inputs are only read; with a float32 output each
    block is summed straight into it)."""
    wd, normalize = x.work_dtype, x.params.normalize
    out = torch.empty(x.tensors[0].shape, dtype=x.out_dtype or wd)
    into = (lambda blocks, dst: weighted_sum(blocks, x.weights, normalize, wd, out=dst)) if out.dtype == wd else None
    return blockwise(out, x.tensors, lambda blocks: weighted_sum(blocks, x.weights, normalize, wd), into)
