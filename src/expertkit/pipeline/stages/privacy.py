"""The ``dp_train`` stage: a differentially private expert (DP-Flat recipe) with its privacy audit.

Runs :func:`expertkit.privacy.recipe.train_private` on the run's base model into
``<run>/private/<task>/`` (``teacher/`` when distilling, ``student/`` the DP model) and
reports accuracy, ε spent, the membership-inference AUC and the top Hessian eigenvalue.
"""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from expertkit.pipeline.config import STAGES
from expertkit.pipeline.context import RunContext
from expertkit.privacy.recipe import PrivateRecipe


class DPTrainParams(PrivateRecipe):
    """Parameters of the ``dp_train`` stage (a :class:`~expertkit.privacy.recipe.PrivateRecipe`)."""

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        from expertkit.pipeline.stages.experts import _known_tasks

        return _known_tasks([v])[0]


class DPTrainStage:
    """Train one expert with differential privacy and audit it."""

    def run(self, ctx: RunContext, params: DPTrainParams) -> dict[str, Any]:
        """Train (or reuse), evaluate, attack."""
        from expertkit.privacy.recipe import train_private

        recipe = params.model_copy(update={"train": params.train.model_copy(update={"seed": ctx.seed})})
        out = ctx.run_dir / "private" / params.task
        result = train_private(ctx.model(), recipe, out)
        result["student"] = str(out.relative_to(ctx.run_dir) / "student")
        return result

    def report(self, result: dict[str, Any]) -> str:
        """One table row: accuracy, ε, MIA AUC, sharpness."""
        p = result["privacy"]
        return "\n".join([
            "| task | accuracy [95% CI] | epsilon (delta) | noise multiplier | MIA AUC | top Hessian eigenvalue |",
            "|---|---:|---:|---:|---:|---:|",
            f"| {result['task']} | {result['accuracy']:.3f} [{result['ci'][0]:.3f}, {result['ci'][1]:.3f}] | "
            f"{p['epsilon']:.3g} ({p['delta']:g}) | {p['noise_multiplier']:.3g} | {result['mia']['auc']:.3f} | "
            f"{result['top_eigenvalue']:.4g} |",
            "",
            f"Student trained on {result['n_private']} private examples ({result['n_public']} public ones for the "
            f"teacher and the layer choice); the attack compares {result['mia']['members']} members with "
            f"{result['mia']['nonmembers']} test examples.",
        ])


STAGES.add("dp_train", DPTrainStage(), params=DPTrainParams,
           summary="train one expert with differential privacy (DP-Flat), report epsilon and membership inference")
