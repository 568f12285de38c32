"""Routing statistics of an MoE: what each router did over a set of prompts, per layer and expert.

:class:`RoutingStats` holds sums that are accumulated in one streamed pass (see
:func:`~expertkit.moe.collect.collect_routing_stats`) and everything derived from them:

* ``counts[l, e]``: real tokens routed to expert ``e`` in layer ``l`` (a token sent to its top-k
  experts counts once for each);
* ``coactivation[l, i, j]``: tokens routed to both ``i`` and ``j`` (diagonal = ``counts``);
* ``logit_gram[l, i, j] = sum_t z_ti z_tj`` and ``logit_sum[l, i]`` over the router logits ``z``:
  :meth:`logit_similarity` is the cosine between experts' logit columns (MC-SMoE groups experts
  whose router logits look alike);
* ``output_cos[l, i, j]``: summed cosine between expert ``i``'s and ``j``'s outputs on the same
  sampled tokens, ``output_mean[l, e]`` their summed outputs (HC-SMoE clusters experts by output);
* ``task_counts[task][l, e]`` and ``task_tokens[task]``: per-task routing profiles.

Derived measures: routing frequencies, the marginal routing entropy ``H(E)`` against the
task-conditional ``H(E | task)`` (specialised routing has the second well below the first), and
the coefficient of variation of expert counts (0 = perfectly balanced).

A compressed MoE may keep fewer experts in some layers (:attr:`RoutingStats.layer_experts`): its
arrays keep the width ``E`` of the largest layer, a smaller layer ``l`` fills its first
``layer_experts[l]`` columns (the rest stay 0) and :meth:`RoutingStats.layer` gives its arrays at
their own size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertkit.errors import CheckpointError

FORMAT = "expertkit-routing-stats-v1"
_ARRAYS = ("counts", "coactivation", "logit_gram", "logit_sum", "tokens", "output_cos", "output_mean",
           "output_tokens")


@dataclass
class RoutingStats:
    """Accumulated routing statistics (arrays indexed by layer position in :attr:`layers`)."""

    layers: list[str]  # layer names ("12", or "encoder.3" for encoder-decoder models)
    num_experts: int
    top_k: int
    counts: np.ndarray  # (L, E)
    coactivation: np.ndarray  # (L, E, E)
    logit_gram: np.ndarray  # (L, E, E)
    logit_sum: np.ndarray  # (L, E)
    tokens: np.ndarray  # (L,) real tokens seen by each router
    output_cos: np.ndarray  # (L, E, E)
    output_mean: np.ndarray  # (L, E, H) or (L, E, 0) when outputs were not sampled
    output_tokens: np.ndarray  # (L,) sampled tokens
    task_counts: dict[str, np.ndarray] = field(default_factory=dict)  # task -> (L, E)
    task_tokens: dict[str, int] = field(default_factory=dict)  # task -> real tokens per router
    meta: dict[str, Any] = field(default_factory=dict)
    layer_experts: list[int] | None = None  # experts held by each layer; None: num_experts in every layer

    @classmethod
    def empty(cls, layers: list[str], num_experts: int, top_k: int, hidden: int, sample: bool,
              layer_experts: list[int] | None = None) -> RoutingStats:
        """Zero sums for ``layers`` (``hidden`` sizes the output means when ``sample``)."""
        n, e = len(layers), num_experts
        z = np.zeros
        if layer_experts is not None and (len(layer_experts) != n or not all(1 <= k <= e for k in layer_experts)):
            raise CheckpointError(f"layer_experts {layer_experts} must give 1..{e} experts for each of {n} layers.")
        per_layer = None if layer_experts is None or set(layer_experts) == {e} else [int(k) for k in layer_experts]
        return cls(list(layers), e, top_k, z((n, e)), z((n, e, e)), z((n, e, e)), z((n, e)), z(n),
                   z((n, e, e)), z((n, e, hidden if sample else 0)), z(n), layer_experts=per_layer)

    def experts_in(self, i: int) -> int:
        """Experts held by the layer at position ``i``."""
        return self.num_experts if self.layer_experts is None else self.layer_experts[i]

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """The arrays of the layer at position ``i`` at its own size ``e``: ``counts (e,)``,
        ``coactivation``/``logit_gram``/``output_cos (e, e)``, ``logit_sum (e,)``, ``output_mean (e, H)``."""
        e = self.experts_in(i)
        return {"counts": self.counts[i, :e], "coactivation": self.coactivation[i, :e, :e],
                "logit_gram": self.logit_gram[i, :e, :e], "logit_sum": self.logit_sum[i, :e],
                "output_cos": self.output_cos[i, :e, :e], "output_mean": self.output_mean[i, :e]}

    # ------------------------------------------------------------------ derived
    def frequencies(self) -> np.ndarray:
        """``(L, E)`` share of routing decisions per expert (rows sum to 1)."""
        return self.counts / np.maximum(self.counts.sum(axis=1, keepdims=True), 1)

    def logit_similarity(self) -> np.ndarray:
        """``(L, E, E)`` cosine similarity between experts' router-logit columns over the tokens seen."""
        return _cosine(self.logit_gram)

    def output_similarity(self) -> np.ndarray:
        """``(L, E, E)`` mean cosine between experts' outputs on the same sampled tokens (NaN if none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.output_cos / self.output_tokens[:, None, None]

    def coactivation_rate(self) -> np.ndarray:
        """``(L, E, E)`` share of tokens routed to both experts."""
        return self.coactivation / np.maximum(self.tokens, 1)[:, None, None]

    def marginal_entropy(self) -> np.ndarray:
        """``(L,)`` entropy (bits) of the routing distribution over experts, all tasks pooled."""
        return np.array([_entropy(row) for row in self.counts])

    def conditional_entropy(self) -> np.ndarray:
        """``(L,)`` task-conditional entropy ``H(E | task)`` (bits), tasks weighted by their tokens."""
        if not self.task_counts:
            return np.full(len(self.layers), np.nan)
        total = sum(self.task_tokens.values())
        out = np.zeros(len(self.layers))
        for task, counts in self.task_counts.items():
            weight = self.task_tokens[task] / max(total, 1)
            out += weight * np.array([_entropy(row) for row in counts])
        return out

    def balance_cv(self) -> np.ndarray:
        """``(L,)`` coefficient of variation of expert counts (std / mean; 0 = perfectly balanced), over
        the experts each layer holds."""
        rows = [self.counts[i, : self.experts_in(i)] for i in range(len(self.layers))]
        return np.array([row.std() / max(row.mean(), 1e-12) for row in rows])

    def summary(self) -> dict[str, Any]:
        """Headline numbers (means over layers) as a JSON-able dict."""
        h, hc = self.marginal_entropy(), self.conditional_entropy()
        return {
            "layers": len(self.layers), "num_experts": self.num_experts, "top_k": self.top_k,
            "tokens": int(self.tokens.max(initial=0)), "tasks": sorted(self.task_counts),
            "marginal_entropy_bits": float(h.mean()), "conditional_entropy_bits": float(np.nanmean(hc))
            if self.task_counts else None, "max_entropy_bits": math.log2(self.num_experts),
            "balance_cv": float(self.balance_cv().mean()),
        }

    # ------------------------------------------------------------------ storage
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (``.npz``) and ``path.json`` (summary + metadata), each atomically."""
        from expertkit.fileio import write_atomic

        path = Path(path)
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        for task, counts in self.task_counts.items():
            arrays[f"task::{task}"] = counts
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_atomic(path, buf.getvalue())
        info = {"format": FORMAT, "layers": self.layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "task_tokens": self.task_tokens, "meta": self.meta, "summary": self.summary(),
                "layer_experts": self.layer_experts}
        write_atomic(path.with_suffix(".json"), (json.dumps(info, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingStats:
        """Read statistics written by :meth:`save`."""
        path = Path(path)
        try:
            info = json.loads(path.with_suffix(".json").read_text())
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read routing statistics {path}: {exc}") from exc
        if info.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not expertkit routing statistics (format {info.get('format')!r}).")
        tasks = {k.split("::", 1)[1]: v for k, v in arrays.items() if k.startswith("task::")}
        return cls(info["layers"], info["num_experts"], info["top_k"], *(arrays[n] for n in _ARRAYS),
                   task_counts=tasks, task_tokens=dict(info["task_tokens"]), meta=info.get("meta", {}),
                   layer_experts=info.get("layer_experts"))


def _cosine(gram: np.ndarray) -> np.ndarray:
    diag = np.sqrt(np.maximum(np.diagonal(gram, axis1=1, axis2=2), 1e-30))  # (L, E)
    return gram / (diag[:, :, None] * diag[:, None, :])


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())
