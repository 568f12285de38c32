"""Grouping trainable tensors into blocks for block-wise zeroth-order descent.

Granularities (ZO-Bench's block-wise ZO): ``layer`` (one transformer block), ``attn-mlp``
(the attention and the MLP of each block apart), ``linear`` (each linear layer; a LoRA
pair ``lora_A``/``lora_B`` stays together). Tensors outside the numbered blocks
(embeddings, final norm, head, prompt encoders) form blocks of their own, by module.
The layer pattern is data: :data:`LAYER_PATTERN` matches ``layers.N``/``h.N``/``block.N``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from expertkit.errors import ConfigError

LAYER_PATTERN = re.compile(r"(?:^|\.)((?:layers|layer|h|blocks|block)\.\d+)(?:\.([^.]+))?")


def _module_of(name: str) -> str:
    """The module owning parameter ``name`` (a LoRA factor maps to its linear layer)."""
    if ".lora_" in name:
        return name.split(".lora_")[0]
    return name.rsplit(".", 1)[0] if "." in name else name


def block_key(name: str, granularity: str) -> str:
    """The block of parameter ``name`` at ``granularity`` (``none``, ``layer``, ``attn-mlp``, ``linear``)."""
    if granularity == "none":
        return "all"
    if granularity == "linear":
        return _module_of(name)
    m = LAYER_PATTERN.search(name)
    if m is None:
        return _module_of(name)
    if granularity == "layer":
        return m.group(1)
    return f"{m.group(1)}.{m.group(2)}" if m.group(2) else m.group(1)


def group_blocks(names: Sequence[str] | None, n: int, granularity: str) -> list[tuple[str, list[int]]]:
    """Blocks as ``(key, tensor ids)`` in order of first appearance; ``none`` gives one block."""
    if granularity == "none":
        return [("all", list(range(n)))]
    if names is None:
        raise ConfigError(f"block='{granularity}' needs parameter names; build the optimizer with names=...")
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        out.setdefault(block_key(name, granularity), []).append(i)
    return list(out.items())
