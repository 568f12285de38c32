"""Model sources: bundled pretrained models, local folders, hub ids, tiny random builders."""

from expertkit.models.bundled import BUNDLED, ensure_bundled
from expertkit.models.loader import LoadedModel, load_model

__all__ = ["BUNDLED", "LoadedModel", "ensure_bundled", "load_model"]
