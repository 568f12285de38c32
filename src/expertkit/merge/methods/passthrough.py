"""Passthrough: copy the single input tensor unchanged (for mergekit-style layer-stacking slices).

Semantics: exactly one input model; its tensor is returned as is (cast to the output dtype by
the executor), times ``scale`` (per model, as in mergekit). Same as mergekit's ``passthrough``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method


class PassthroughParams(MethodParams):
    """Parameters of ``passthrough``."""

    scale: float = Field(1.0, description="multiply the tensor by this factor")


@merge_method("passthrough", params=PassthroughParams, min_models=1, max_models=1, uses_weights=False,
              per_model=("scale",),
              vs_mergekit="equal, bit for bit",
              paper="mergekit (Goddard et al. 2024, arXiv:2403.13257)",
              summary="copy one model's tensors (layer stacking with slices)")
def passthrough(x: TensorInputs) -> torch.Tensor:
    """The one input tensor times ``scale`` (given globally or, as mergekit allows, on the model)."""
    return x.work(x.tensors[0]).mul_(x.per_model[0].scale)
