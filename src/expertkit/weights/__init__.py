"""The streaming weights engine.

* :class:`Checkpoint`: lazy reader of safetensors folders (single or sharded), one tensor at a time.
* :class:`ShardedWriter`: atomic sharded safetensors writer (temporary folder, fsync, rename).
* :mod:`~expertkit.weights.arch`: architecture descriptors as data (YAML) and tensor-name grouping.
* :func:`task_vector`, :class:`LoraAdapter`, :class:`Patch`: deltas between models.
* :func:`fingerprint`: a short, stable identity of a set of weights.
"""

from expertkit.weights.arch import ArchSummary, TensorRole, classify, describe, descriptor_for, list_architectures
from expertkit.weights.deltas import apply_delta, task_vector
from expertkit.weights.fingerprint import fingerprint
from expertkit.weights.lora import LoraAdapter, lora_delta
from expertkit.weights.patch import Patch
from expertkit.weights.reader import Checkpoint, TensorInfo
from expertkit.weights.summary import checkpoint_summary
from expertkit.weights.writer import ShardedWriter, save_state_dict

__all__ = [
    "ArchSummary", "Checkpoint", "LoraAdapter", "Patch", "ShardedWriter", "TensorInfo", "TensorRole",
    "apply_delta", "checkpoint_summary", "classify", "describe", "descriptor_for", "fingerprint",
    "list_architectures", "lora_delta", "save_state_dict", "task_vector",
]
