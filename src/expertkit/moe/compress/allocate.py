"""How many experts each MoE layer keeps, for a total budget.

* ``adaptive`` (MC-SMoE's): one global threshold on routing frequency. Frequencies are normalised
  within each layer (each layer's shares sum to 1, so layers of any size compare), every layer first
  keeps its ``min_experts`` most frequent experts, and the rest of the budget goes to the most
  frequent experts left anywhere in the model (ties: lower layer, then lower expert id). A layer
  whose routing is concentrated on few experts keeps few; a balanced one keeps more.
* ``uniform``: every layer keeps the same number (the budget must divide evenly).

Every method of a comparison is given the same allocation, so their expert parameter counts are
equal exactly, layer by layer.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from expertkit.errors import ConfigError


def allocate(frequencies: np.ndarray, total: int, *, mode: Literal["adaptive", "uniform"] = "adaptive",
             min_experts: int = 1) -> list[int]:
    """Experts kept per layer (sums to ``total``) from ``(L, E)`` routing shares."""
    freq = np.asarray(frequencies, dtype=np.float64)
    n_layers, n_experts = freq.shape
    if not n_layers * min_experts <= total <= n_layers * n_experts:
        raise ConfigError(f"cannot keep {total} experts in {n_layers} layers of {n_experts} "
                          f"with at least {min_experts} per layer; choose between {n_layers * min_experts} "
                          f"and {n_layers * n_experts} ({min_experts} to {n_experts} per layer).")
    if mode == "uniform":
        if total % n_layers:
            raise ConfigError(f"uniform allocation needs a multiple of {n_layers} experts in all; got {total}.")
        return [total // n_layers] * n_layers
    shares = freq / np.maximum(freq.sum(axis=1, keepdims=True), 1e-12)
    keep = [min_experts] * n_layers
    order = [(-shares[l, e], l, e) for l in range(n_layers) for e in range(n_experts)]
    ranked = {l: sorted(range(n_experts), key=lambda e, l=l: (-shares[l, e], e)) for l in range(n_layers)}
    taken = {(l, e) for l in range(n_layers) for e in ranked[l][:min_experts]}
    left = total - n_layers * min_experts
    for _, l, e in sorted(order):
        if left == 0:
            break
        if (l, e) not in taken:
            # the layer's next most frequent expert is at least as frequent as this one, so taking
            # "one more" for the layer is taking this expert's place in the layer's ranking
            keep[l] += 1
            taken.add((l, e))
            left -= 1
    return keep
