"""Merge methods, one file each, registered by name in :data:`METHODS` when imported.

Every module of this package is imported here, so adding a method is one new file that calls
:func:`merge_method`; no other file changes.
"""

import importlib
import pkgutil

from expertkit.merge.methods.base import METHODS, MergeMethod, MethodParams, TensorInputs, merge_method

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "MergeMethod", "MethodParams", "TensorInputs", "merge_method"]
