"""Frequency-based expert pruning (baseline): keep the most frequently routed experts.

The ``keep`` experts that receive the largest share of routing decisions on the calibration
prompts stay, with their own router rows; the others are removed together with their rows, so the
router chooses its top-k among the experts left (the stock transformers form is exact).
"""

from __future__ import annotations

from expertkit.moe.compress.base import LayerInput, LayerPlan, MethodParams, compress_method, prune_plan


class PruneFrequencyParams(MethodParams):
    """``prune_frequency`` has no parameters."""


@compress_method("prune_frequency", params=PruneFrequencyParams, paper="baseline (expert pruning by routing "
                 "frequency, e.g. Chen et al. 2022, Task-specific expert pruning)",
                 summary="keep the most frequently routed experts and their router rows")
def prune_frequency(layer: LayerInput, params: PruneFrequencyParams) -> LayerPlan:
    """Keep the ``keep`` most frequent experts."""
    return prune_plan(layer, layer.frequencies)
