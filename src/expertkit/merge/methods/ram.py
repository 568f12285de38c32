"""RAM (Reinforced Agent Merging): average task-vector entries several models share, keep the
entries only one model changed.

Semantics, per tensor and element (Yuan et al. 2026, Behavior Knowledge Merge in Reinforced
Agentic Models, arXiv:2601.13572): task vectors ``d_i = theta_i - base``; model *i* is *active*
at an element when ``|d_i| > epsilon`` (inactive entries are dropped, set to 0). With ``c`` the
number of active models there, the merged task vector is ``sum_i [active_i] d_i / max(c, 1)``:
the mean over the active models where several changed the element (*shared*), the one model's
change where only it did (*unique*), 0 where none did. The result is ``base`` plus it. RL
fine-tuning changes few and different parameters per task, so plain averaging would dilute
each unique change by the number of models. Per-model weights play no part. Same as
mergekit 0.1.5's ``ram``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method


class RamParams(MethodParams):
    """Parameters of ``ram``."""

    epsilon: float = Field(1e-5, ge=0.0, description="|task-vector entry| above this counts as a change")


def active_deltas(x: TensorInputs, epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(task vectors with inactive entries zeroed, per-element count of active models)."""
    deltas = x.deltas()
    count = torch.zeros_like(deltas[0])  # (*shape)
    for d in deltas:
        active = d.abs() > epsilon
        d.mul_(active)
        count.add_(active)
    return deltas, count


@merge_method("ram", params=RamParams, needs_base=True, min_models=1, uses_weights=False,
              vs_mergekit="equal (1e-6)",
              paper="Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM, arXiv:2601.13572)",
              summary="mean of the task-vector entries several models changed, unique changes kept whole")
def ram(x: TensorInputs) -> torch.Tensor:
    """``base + sum_i [active_i] d_i / max(count, 1)``."""
    deltas, count = active_deltas(x, x.params.epsilon)
    total = deltas[0]
    for d in deltas[1:]:
        total.add_(d)
    return total.div_(count.clamp_(min=1)).add_(x.base.to(x.work_dtype))
