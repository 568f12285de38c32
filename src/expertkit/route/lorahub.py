"""LoraHub: one weight per expert, found without gradients on a few examples of the target task.

The composed module is ``(sum_e w_e B_e)(sum_e w_e A_e)`` (LoraHub composes A and B apart); the
weights minimise the mean training loss on ``lorahub_examples`` examples plus ``lorahub_l1`` times
the mean ``|w_e|``, from ``w = 0`` in the box ``[-1.5, 1.5]``, with at most ``lorahub_budget`` loss
evaluations. The search is CMA-ES from the ``cma`` package through the zoo planner's adapter
(:func:`expertkit.merge.zoo.cmaes.cmaes_minimize`: a hard evaluation cap, the best point evaluated,
seeded by the router's ``seed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class LoraHubFit:
    """The weights found, the objective there, and how many evaluations it took."""

    weights: torch.Tensor  # (E,)
    objective: float
    evaluations: int


def fit_lorahub(router: Any, task: Any) -> LoraHubFit:
    """Fit LoraHub's expert weights for ``task`` with ``router`` (method ``lorahub``); the router's
    state is left in lorahub mode without weights set."""
    from expertkit.merge.zoo.cmaes import cmaes_minimize
    from expertkit.route.layers import attach
    from expertkit.tasks.base import get_task
    from expertkit.train.data import encode_examples, make_loss_fn

    cfg = router.config
    task = get_task(task) if isinstance(task, str) else task
    examples = task.examples("train", cfg.lorahub_examples, 20_000 + cfg.seed)
    rows = encode_examples(router.loaded.tokenizer, task, examples, cfg.max_prompt_tokens)
    state = router.state
    detach = attach(router.loaded.model, router.stacks, _with_weights(state, len(router.library.experts)))
    loss_fn = make_loss_fn(router.loaded.model, router.loaded.tokenizer, rows)

    def objective(w: np.ndarray) -> float:
        state.weights = torch.as_tensor(w, dtype=torch.float32)
        with torch.inference_mode():
            loss = float(loss_fn().mean())
        return loss + cfg.lorahub_l1 * float(np.abs(w).mean())

    try:
        res = cmaes_minimize(objective, np.zeros(len(router.library.experts)), 0.5, budget=cfg.lorahub_budget,
                             bounds=(-1.5, 1.5), seed=cfg.seed)
    finally:
        detach()
        state.weights = None
    return LoraHubFit(torch.as_tensor(res.x, dtype=torch.float32), float(res.fx), res.evaluations)


def _with_weights(state: Any, n: int) -> Any:
    state.weights = torch.zeros(n)  # attach checks that lorahub mode has one weight per expert
    return state
