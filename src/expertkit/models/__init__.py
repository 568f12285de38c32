"""Model sources: bundled pretrained models, local folders, hub ids, tiny random builders."""

from expertkit.models.bundled import BUNDLED, ensure_bundled
from expertkit.models.embedder import EMBEDDERS, load_embedder
from expertkit.models.loader import LoadedModel, load_model

__all__ = ["BUNDLED", "EMBEDDERS", "LoadedModel", "ensure_bundled", "load_embedder", "load_model"]
