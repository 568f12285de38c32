"""Plain average merge (baseline): M-SMoE's groups, merged by a uniform average without alignment.

The grouping is M-SMoE's (dominant experts by frequency, members by router-logit similarity), so
the comparison with ``msmoe`` isolates the merge itself: neurons are averaged position by position
as they happen to be stored, every member with the same weight. Group routing, as ``msmoe``.
"""

from __future__ import annotations

from expertkit.moe.compress.base import LayerInput, LayerPlan, MethodParams, compress_method, dominant_groups, merge_groups


class AverageParams(MethodParams):
    """``average`` has no parameters."""


@compress_method("average", params=AverageParams, paper="baseline (plain weight averaging, as in model soups)",
                 summary="M-SMoE's groups merged by a uniform average, no neuron alignment; group routing")
def average(layer: LayerInput, params: AverageParams) -> LayerPlan:
    """Uniform, unaligned average of each M-SMoE group."""
    groups = dominant_groups(layer)
    return merge_groups(layer, groups, weighting="uniform", align=False)
