"""Load a script of ``experiments/`` or ``bench/`` as a module: they are scripts, not importable packages.

The module is not put in ``sys.modules``, so functions defined in it travel to Ray workers by value
(the experiments' sweep cells rely on that).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """The script at ``ROOT / relative`` (e.g. ``experiments/dp_flat.py``), executed as a fresh module."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
