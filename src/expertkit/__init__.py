"""expertkit: a toolkit for the whole life of expert models.

Train, merge, route, port and compress fine-tuned variants (full fine-tunes,
LoRA adapters, MoE experts) of one pretrained transformer on limited hardware.
"""

from expertkit.errors import ExpertkitError

__version__ = "0.1.0"
__all__ = ["ExpertkitError", "__version__"]
