"""M-SMoE (Li et al., 2024): merge the experts of each layer into its dominant ones, guided by routing.

1. Dominant experts: the ``keep`` most frequently routed experts of the layer (how many each layer
   keeps is decided beforehand, globally across layers: :mod:`~expertkit.moe.compress.allocate`).
2. Grouping: every other expert joins the dominant expert whose router-logit column it resembles
   most (cosine over the calibration tokens, from the routing statistics).
3. Alignment: each member's intermediate neurons are permuted onto the dominant expert's
   (:mod:`~expertkit.moe.compress.align`, SwiGLU-aware weight matching).
4. Merge: the frequency-weighted average of the aligned members.

The router keeps its rows (group routing): tokens the router sends to any member reach the merge.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from expertkit.moe.compress.base import LayerInput, LayerPlan, MethodParams, compress_method, dominant_groups, merge_groups


class MsmoeParams(MethodParams):
    """Parameters of ``msmoe``."""

    align: bool = Field(True, description="permute every member's neurons onto its dominant expert before merging")
    weighting: Literal["frequency", "uniform"] = Field(
        "frequency", description="merge weights: routing frequency of each member (the paper), or uniform")


@compress_method("msmoe", params=MsmoeParams, paper="Li et al., Merge, Then Compress: Demystify Efficient SMoE "
                 "with Hints from Its Routing Policy (ICLR 2024)",
                 summary="dominant experts by frequency, groups by router-logit similarity, aligned, "
                         "frequency-weighted merge; group routing")
def msmoe(layer: LayerInput, params: MsmoeParams) -> LayerPlan:
    """M-SMoE's merge of one layer."""
    groups = dominant_groups(layer)
    return merge_groups(layer, groups, weighting=params.weighting, align=params.align)
