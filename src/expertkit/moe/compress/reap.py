"""REAP (Lasby et al., 2025): prune the experts with the least router-weighted activation.

An expert's saliency is the mean, over the calibration tokens routed to it, of its gate value
times the L2 norm of its output, ``S_e = mean_{x -> e} g_e(x) ||f_e(x)||``: an expert that is
rarely chosen, chosen with a small weight, or that outputs little, matters least. The ``keep``
most salient experts stay with their router rows (prune routing).

:func:`reap_scores` measures ``S`` in one pass over calibration prompts through the routing
subsystem's :class:`~expertkit.moe.routing.RoutingTap` (the router's own choices and logits); the
gate value is the router's score of the expert (softmax, or sigmoid for sigmoid routers, over all
experts, before any top-k renormalisation) and ``f_e`` is evaluated on exactly the tokens routed to
``e``, which costs one more pass of the experts' compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from expertkit.errors import ConfigError
from expertkit.moe.compress.base import LayerInput, LayerPlan, MethodParams, compress_method, prune_plan


class ReapParams(MethodParams):
    """``reap`` has no parameters (its scores come from the calibration prompts)."""


@compress_method("reap", params=ReapParams, needs=("reap",),
                 paper="Lasby et al., REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression (2025)",
                 summary="keep the experts with the largest router-weighted output norm and their router rows")
def reap(layer: LayerInput, params: ReapParams) -> LayerPlan:
    """Keep the ``keep`` most salient experts."""
    if layer.reap is None:
        raise ConfigError("reap needs REAP scores (reap_scores over calibration prompts).")
    return prune_plan(layer, layer.reap)


@torch.no_grad()
def reap_scores(model: Any, tokenizer: Any, prompts: Mapping[str, Sequence[str]], *, batch_size: int = 8,
                max_tokens: int = 256) -> np.ndarray:
    """``(L, E)`` REAP saliency of every expert of every MoE layer, in the tap's layer order."""
    from expertkit.moe.collect import _batches
    from expertkit.moe.routing import RouterEvent, RoutingTap, forward_batches

    tap = RoutingTap(model)
    if tap.routing.expert_call != "topk":
        raise ConfigError(f"{tap.descriptor.name}: REAP scores need experts called by top-k index.")
    position = {key: i for i, key in enumerate(tap.layers)}
    sums = np.zeros((len(tap.layers), tap.num_experts))  # (L, E); a compressed layer fills its first e columns
    counts = np.zeros_like(sums)

    def sink(event: RouterEvent) -> None:
        i = position[event.key]
        experts = tap.layers[event.key][1]
        score = torch.sigmoid(event.logits) if tap.routing.score == "sigmoid" else torch.softmax(event.logits, -1)
        for e in range(tap.layer_experts[event.key]):
            tokens = (event.chosen[:, e] > 0) & event.mask  # (N,)
            n = int(tokens.sum())
            if not n:
                continue
            h = event.hidden[tokens]  # (n, H)
            out = experts(h, torch.full((n, 1), e, dtype=torch.long), torch.ones(n, 1, dtype=h.dtype))  # (n, H)
            sums[i, e] += float((score[tokens, e] * out.float().norm(dim=-1)).sum())
            counts[i, e] += n

    tap.sink = sink
    work = [b for group in prompts.values() if group for b in _batches(tokenizer, group, batch_size, max_tokens)]
    if not work:
        raise ConfigError("REAP scores need at least one calibration prompt.")
    with tap:
        forward_batches(model, work, "REAP scores", watchers=[tap])
    return sums / np.maximum(counts, 1)
