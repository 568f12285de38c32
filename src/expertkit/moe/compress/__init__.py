"""Merging and compressing the experts of an MoE: MC-SMoE and its baselines (``expertkit moe compress``).

* :data:`METHODS`: one file per method, registered by name where it is defined: ``msmoe`` (M-SMoE),
  ``average``, ``random_group``, ``hcsmoe`` (merging, group routing), ``prune_frequency``, ``reap``
  (pruning). Every module of this package that is not infrastructure is imported here, so adding a
  method is one new file.
* :func:`compress_moe` / :class:`CompressConfig`: calibrate, allocate experts per layer, compress
  streaming one new expert at a time, the C step (low rank + structured sparse), distillation recovery.
* The output loads through :func:`expertkit.models.load_model` (see :mod:`expertkit.moe.compressed`).
"""

import importlib
import pkgutil

from expertkit.moe.compress.base import (
    METHODS,
    CompressMethod,
    ExpertSource,
    LayerInput,
    LayerPlan,
    MethodParams,
    StackedExperts,
    compress_method,
)

_INFRASTRUCTURE = {"align", "allocate", "api", "base", "config", "kd", "layers", "lowrank", "run"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_info.name}")

from expertkit.moe.compress.api import calibrate, compress_moe, keep_per_layer, recover  # noqa: E402
from expertkit.moe.compress.config import CompressConfig  # noqa: E402
from expertkit.moe.compress.run import CompressResult, LayerStats, compress_checkpoint  # noqa: E402

__all__ = [
    "METHODS", "CompressConfig", "CompressMethod", "CompressResult", "ExpertSource", "LayerInput", "LayerPlan", "LayerStats",
    "MethodParams", "StackedExperts", "calibrate", "compress_checkpoint", "compress_method", "compress_moe", "keep_per_layer", "recover",
]
