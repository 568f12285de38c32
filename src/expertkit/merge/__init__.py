"""Model merging: methods registered by name, the in-memory reference merge, the streaming executor.

* :data:`METHODS`: the registry of merge methods (one file each in ``merge/methods/``), each with
  its paper and declared parameters (``expertkit merge methods`` lists them).
* :func:`merge_state_dicts`: the in-memory reference merge of whole state dicts.
* :class:`MergeConfig`, :func:`load_merge_config`, :func:`run_merge`: the mergekit-compatible YAML
  config and the streaming executor that writes a loadable model folder atomically
  (``expertkit merge CONFIG OUT``).
"""

from expertkit.merge.core import merge_state_dicts, merge_tensor, resolve_params
from expertkit.merge.methods import METHODS, MergeMethod, MethodParams, TensorInputs

__all__ = [
    "METHODS", "MergeConfig", "MergeMethod", "MethodParams", "TensorInputs", "load_merge_config",
    "merge_state_dicts", "merge_tensor", "resolve_params", "run_merge",
]


def __getattr__(name: str):  # the config and executor are imported on first use
    if name in ("MergeConfig", "load_merge_config"):
        from expertkit.merge import config

        return getattr(config, name)
    if name == "run_merge":
        from expertkit.merge.executor import run_merge

        return run_merge
    raise AttributeError(name)
