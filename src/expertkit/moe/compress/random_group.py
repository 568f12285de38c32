"""Random grouping (baseline): M-SMoE's merge applied to a random partition of the experts.

The experts of a layer are shuffled (seeded) and cut into ``keep`` non-empty groups of near-equal
size; each group's most frequently routed member is its anchor, the others are aligned onto it and
merged with frequency weights, exactly as ``msmoe`` does. The comparison isolates the grouping.
"""

from __future__ import annotations

import numpy as np

from expertkit.moe.compress.base import LayerInput, LayerPlan, MethodParams, compress_method, merge_groups


class RandomGroupParams(MethodParams):
    """``random_group`` has no parameters (the run's seed draws the groups)."""


@compress_method("random_group", params=RandomGroupParams, paper="baseline (ablation of M-SMoE's grouping)",
                 summary="random partition into groups, then M-SMoE's aligned frequency-weighted merge; group routing")
def random_group(layer: LayerInput, params: RandomGroupParams) -> LayerPlan:
    """Random groups, aligned and frequency-weighted."""
    order = layer.rng.permutation(layer.num_experts)
    groups = []
    for chunk in np.array_split(order, layer.keep):
        members = sorted(int(e) for e in chunk)
        anchor = max(members, key=lambda e: (layer.frequencies[e], -e))
        groups.append([anchor] + [e for e in members if e != anchor])
    return merge_groups(layer, groups, weighting="frequency", align=True)
