"""HC-SMoE (Chen et al., 2025): retraining-free merging by hierarchical clustering of expert outputs.

Each expert is described by its mean output on the same calibration tokens (from the routing
statistics' output means: every expert evaluated on the same sampled tokens, whatever the router
chose). The experts of a layer are clustered by average linkage on the Euclidean distance between
these vectors (``scipy.cluster.hierarchy``) and the tree is cut into exactly ``keep`` clusters;
each cluster is merged by frequency-weighted averaging, without neuron alignment. Group routing.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from expertkit.errors import ConfigError
from expertkit.moe.compress.base import LayerInput, LayerPlan, MethodParams, compress_method, merge_groups


class HcsmoeParams(MethodParams):
    """Parameters of ``hcsmoe``."""

    linkage: Literal["average", "single", "complete"] = Field("average", description="linkage of the clustering")
    weighting: Literal["frequency", "uniform"] = Field("frequency", description="merge weights within a cluster")


@compress_method("hcsmoe", params=HcsmoeParams, paper="Chen et al., Retraining-Free Merging of Sparse MoE via "
                 "Hierarchical Clustering (ICML 2025)",
                 summary="hierarchical clustering of experts by mean output, frequency-weighted merge; group routing")
def hcsmoe(layer: LayerInput, params: HcsmoeParams) -> LayerPlan:
    """Cluster by output, merge each cluster."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    if layer.output_mean is None or layer.output_mean.shape[-1] == 0:
        raise ConfigError("hcsmoe needs expert output means: collect routing statistics with sample_tokens > 0.")
    feats = np.asarray(layer.output_mean, dtype=np.float64)  # (E, H)
    if layer.keep == layer.num_experts:
        labels = np.arange(layer.num_experts)
    else:
        tree = linkage(feats, method=params.linkage, metric="euclidean")
        labels = cut_tree(tree, n_clusters=layer.keep).reshape(-1)
    groups = []
    for c in sorted(set(labels.tolist()), key=lambda c: int(np.flatnonzero(labels == c)[0])):
        members = [int(e) for e in np.flatnonzero(labels == c)]
        anchor = max(members, key=lambda e: (layer.frequencies[e], -e))
        groups.append([anchor] + [e for e in members if e != anchor])
    return merge_groups(layer, groups, weighting=params.weighting, align=False)
