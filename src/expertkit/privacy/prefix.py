"""Flatness-guided sparse prefix tuning: which layers' prefixes to train, chosen by sharpness.

PEFT's prefix tuning keeps all prefixes in one embedding of shape
``(virtual tokens, layers * 2 * kv_dim)``; layer ``l``'s keys and values are the column block
``[l * 2 * kv_dim, (l + 1) * 2 * kv_dim)`` (PEFT views the row as ``(layers * 2, kv heads,
head_dim)``, key then value per layer). Sparse prefix tuning trains the blocks of chosen layers
only: :func:`prefix_masks` gives the 0/1 mask DP-SGD applies to per-example gradients before
clipping and to the noise after it, so no clipping norm and no noise is spent on the others,
which keep their initial values (PEFT puts a prefix in every layer; the untrained ones stay fixed).

:func:`layer_sharpness` measures each layer's block by the top Hessian eigenvalue of the loss
restricted to it (:mod:`expertkit.privacy.sharpness`), on **public** examples only, so the
choice spends no privacy; :func:`select_layers` takes the ``k`` flattest (DP noise hurts least
along flat directions) or sharpest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from expertkit.errors import ConfigError


def prefix_parameter(model: Any) -> tuple[str, torch.nn.Parameter, int]:
    """``(name, parameter, layers)`` of the prefix embedding of a PEFT prefix-tuning model."""
    cfg = getattr(model, "peft_config", {}).get("default")
    if cfg is None or getattr(cfg, "peft_type", None) is None or str(cfg.peft_type.value) != "PREFIX_TUNING":
        raise ConfigError("sparse prefix tuning (prefix_layers) needs scheme 'prefix'.")
    for name, p in model.named_parameters():
        if "prompt_encoder" in name and name.endswith("embedding.weight"):
            return name, p, int(cfg.num_layers)
    raise ConfigError("no prefix embedding found in the PEFT model (a prefix projection is not supported).")


def layer_columns(param: torch.Tensor, layers: int, layer: int) -> slice:
    """The column block of ``layer`` in the prefix embedding ``(virtual tokens, layers * 2 * kv_dim)``."""
    width, rem = divmod(param.shape[1], layers)
    if rem:
        raise ConfigError(f"prefix embedding width {param.shape[1]} is not divisible by {layers} layers.")
    if not 0 <= layer < layers:
        raise ConfigError(f"prefix layer {layer} does not exist; the model has layers 0..{layers - 1}.")
    return slice(layer * width, (layer + 1) * width)


def prefix_masks(model: Any, layers: Sequence[int]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """``{prefix parameter: 0/1 mask}`` with ones on the column blocks of ``layers``."""
    _, param, n_layers = prefix_parameter(model)
    mask = torch.zeros_like(param)  # (virtual tokens, layers * 2 * kv_dim)
    for layer in layers:
        mask[:, layer_columns(param, n_layers, layer)] = 1.0
    return {param: mask}


def layer_sharpness(model: Any, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *,
                    iters: int = 8, seed: int = 0) -> list[float]:
    """Top Hessian eigenvalue of the mean per-example loss on ``batch`` for each layer's prefix block."""
    from expertkit.privacy.sharpness import top_eigenvalue

    _, param, n_layers = prefix_parameter(model)
    return [
        top_eigenvalue(model, [param], batch, iters=iters, seed=seed,
                       block=(0, layer_columns(param, n_layers, layer)))
        for layer in range(n_layers)
    ]


def select_layers(sharpness: Sequence[float], k: int, prefer: str = "flat") -> tuple[int, ...]:
    """The ``k`` layers with the smallest (``flat``) or largest (``sharp``) sharpness, in layer order."""
    if not 1 <= k <= len(sharpness):
        raise ConfigError(f"choose between 1 and {len(sharpness)} prefix layers; got {k}.")
    if prefer not in ("flat", "sharp"):
        raise ConfigError(f"prefer must be 'flat' or 'sharp'; got '{prefer}'.")
    order = sorted(range(len(sharpness)), key=lambda i: (sharpness[i], i), reverse=prefer == "sharp")
    return tuple(sorted(order[:k]))
