"""Built-in pipeline stages: every module in this package registers its stages in ``STAGES``.

Adding a stage means adding a module here; no other file changes.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
