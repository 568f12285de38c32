"""expertkit.route: GLIDER (global and local routing over a library of LoRA experts) and its baselines.

* :class:`ExpertLibrary` / :func:`build_library`: LoRA experts on one base, one per task, each with a
  description and Phatgoose gate vectors; built with expertkit's expert training, cached, resumable.
* :class:`GlobalRouter` / :class:`InstructionWriter`: an LLM writes each query's task instruction
  (cached by query hash); an embedder scores it against the expert descriptions.
* :class:`Router` / :class:`RouteConfig`: GLIDER and the baselines (Phatgoose, Arrow via PEFT,
  LoraHub, retrieval, uniform merge, oracle, base) on the same library, routing per token inside
  batched generation; :func:`evaluate_router` scores any of them on the same examples.
"""

from expertkit.route.build import HELD_IN, HELD_OUT, LibraryConfig, build_library, default_library_dir
from expertkit.route.config import ALPHA_PRESETS, METHODS, RouteConfig
from expertkit.route.evaluate import evaluate_router, score_examples
from expertkit.route.gates import GateConfig, train_gates
from expertkit.route.global_router import GlobalRouter, InstructionWriter, retrieval_scores
from expertkit.route.library import Expert, ExpertLibrary, LoraStack
from expertkit.route.router import Router

__all__ = [
    "ALPHA_PRESETS",
    "HELD_IN",
    "HELD_OUT",
    "METHODS",
    "Expert",
    "ExpertLibrary",
    "GateConfig",
    "GlobalRouter",
    "InstructionWriter",
    "LibraryConfig",
    "LoraStack",
    "RouteConfig",
    "Router",
    "build_library",
    "default_library_dir",
    "evaluate_router",
    "retrieval_scores",
    "score_examples",
    "train_gates",
]
