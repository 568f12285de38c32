"""Base sketches: estimate how far a base model moved without keeping the old base.

A sketch of a tensor ``x`` (``n`` elements) is its values at ``m`` coordinates drawn uniformly
(with replacement) by a generator seeded from the tensor's *name* and the sketch seed, so any
model with that tensor name is sampled at the same coordinates. With ``s_old`` and ``s_new``
the sketches of the same tensor in two models,

    ||x_new - x_old||^2  ~=  (n / m) * ||s_new - s_old||^2,

an unbiased estimate (uniform sampling with replacement); likewise for ``||x_old||``. Its
relative error is about ``sqrt(2 / m)`` when the change is spread over the tensor, as it is after
continued pretraining (``m = 2048`` gives about 3%), larger when only a few coordinates moved.
:func:`expertkit.port.extract_patch` stores the old base's sketch of every patched tensor in the
patch, so ``expertkit port apply`` can report the drift of a new base without the old one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch

from expertkit.weights.deltas import TensorSource

SKETCH_SIZE = 2048
SKETCH_SEED = 0


def sketch_indices(name: str, numel: int, m: int = SKETCH_SIZE, seed: int = SKETCH_SEED) -> torch.Tensor:
    """The ``m`` flat coordinates sampled for tensor ``name`` of ``numel`` elements."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randint(0, numel, (m,), generator=gen)


def sketch_tensor(name: str, tensor: torch.Tensor, m: int = SKETCH_SIZE) -> torch.Tensor:
    """The sketch of one tensor: float32 values at :func:`sketch_indices`."""
    flat = tensor.detach().reshape(-1)
    return flat[sketch_indices(name, flat.numel(), m)].float()


def sketch_source(source: TensorSource, names: Iterable[str], m: int = SKETCH_SIZE) -> dict[str, torch.Tensor]:
    """Sketches of ``names`` (floating-point tensors only) read one at a time from ``source``."""
    out = {}
    for name in names:
        if source.dtype(name).is_floating_point:
            out[name] = sketch_tensor(name, source.read(name), m)
    return out


def estimate_norm(sketch: torch.Tensor, numel: int) -> float:
    """Estimated Frobenius norm of the whole tensor from its sketch."""
    return math.sqrt(numel / sketch.numel()) * float(sketch.double().norm())


def estimate_distance(a: torch.Tensor, b: torch.Tensor, numel: int) -> float:
    """Estimated ``||x_a - x_b||`` from the sketches ``a`` and ``b`` of the same tensor."""
    if a.shape != b.shape:
        raise ValueError(f"sketches differ in size ({a.numel()} vs {b.numel()}); they were made with different m.")
    return math.sqrt(numel / a.numel()) * float((a.double() - b.double()).norm())
