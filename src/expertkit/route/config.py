"""Configuration of routing: the method (GLIDER or a baseline) and its knobs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from expertkit.config import Config

#: Methods of :class:`~expertkit.route.Router`, each with a one-line summary (CLI and docs).
METHODS: dict[str, str] = {
    "glider": "GLIDER: per-token local (Phatgoose) logits + alpha x global instruction scores, top-k",
    "phatgoose": "Phatgoose: per-token local gate logits only, top-k",
    "global": "GLIDER's global router alone: top-k experts by the written instruction, for every token",
    "retrieval": "LoraRetriever-style: the top-1 expert by the query's embedding vs its task's inputs",
    "arrow": "Arrow (PEFT 0.21's ArrowConfig router): per-token top-k by each expert's top singular vector",
    "lorahub": "LoraHub: one weight per expert found gradient-free (CMA-ES) on a few task examples",
    "uniform": "uniform merge: the mean of the experts' weight deltas",
    "oracle": "the expert trained on the query's own task (held-in tasks only)",
    "base": "the base model without experts",
}
#: GLIDER sets alpha apart for held-in and held-out queries. These are expertkit's defaults (chosen so
#: that a global score difference of ~0.3 outweighs the local correlations on held-in queries and
#: barely moves them on held-out ones); the values in the paper were NOT checked in this session.
ALPHA_PRESETS: dict[str, float] = {"held_in": 1.0, "held_out": 0.1}


class RouteConfig(Config):
    """How a library is routed (frozen; unknown keys are errors)."""

    method: Literal["glider", "phatgoose", "global", "retrieval", "arrow", "lorahub", "uniform", "oracle", "base"] = \
        Field("glider", description="routing method (see expertkit.route.METHODS)")
    top_k: int = Field(2, ge=1, description="experts per token (glider, phatgoose, global, arrow)")
    alpha: float | Literal["held_in", "held_out", "auto"] = Field(
        "auto", description="weight of the global scores in GLIDER: a number, a preset (held_in / held_out), "
        "or auto: held_in when the query's best global score reaches held_in_threshold, else held_out")
    held_in_threshold: float = Field(0.5, ge=-1, le=1, description="auto alpha: best cosine that counts as held-in")
    temperature: float = Field(0.1, gt=0, description="softmax temperature over each token's top-k scores")
    arrow_temperature: float = Field(1.0, gt=0, description="Arrow's router temperature (PEFT ArrowConfig)")
    lorahub_examples: int = Field(5, ge=1, description="LoraHub: training examples of the target task")
    lorahub_budget: int = Field(40, ge=2, description="LoraHub: loss evaluations of the gradient-free search")
    lorahub_l1: float = Field(0.05, ge=0, description="LoraHub: L1 penalty on the expert weights")
    expert_instructions: int = Field(5, ge=0, description="GLIDER: training inputs per expert whose written "
                                     "instructions join its description in the expert's global vector (0: description only)")
    retrieval_examples: int = Field(10, ge=1, description="retrieval: training inputs embedded per expert")
    max_prompt_tokens: int = Field(1024, ge=1, description="prompts longer than this keep their last tokens")
    seed: int = Field(0, description="seed of LoraHub's search and of the examples it uses")

    def alpha_for(self, best_global: float) -> float:
        """GLIDER's alpha for a query whose best global score is ``best_global``."""
        if isinstance(self.alpha, float | int):
            return float(self.alpha)
        if self.alpha == "auto":
            return ALPHA_PRESETS["held_in" if best_global >= self.held_in_threshold else "held_out"]
        return ALPHA_PRESETS[self.alpha]
