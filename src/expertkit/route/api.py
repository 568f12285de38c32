"""One call from a library folder and a method to a ready :class:`Router` (CLI, pipeline, experiment).

``make_router(loaded, library, config)`` builds what the method needs and nothing more: the global
router (the base model writes instructions, cached under ``<cache>/route/instructions``; the
embedder embeds them) for GLIDER and the global router, the embedder for retrieval.
:func:`evaluate_methods` scores several methods on the same examples of each task and returns the
per-example scores a paired test needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expertkit.route.config import RouteConfig
from expertkit.route.library import ExpertLibrary
from expertkit.route.router import Router


def instruction_cache() -> Path:
    """Where written instructions are cached (one small JSON per query hash)."""
    from expertkit.models.bundled import cache_root

    return cache_root() / "route" / "instructions"


def library_model(library: ExpertLibrary, model: str | None = None) -> str:
    """The base model source of a library: ``model`` if given, else the one its build recorded."""
    return model or (library.meta.get("config") or {}).get("model") or "smollm2-135m"


def expert_inputs(library: ExpertLibrary, k: int, seed: int = 0) -> list[list[str]] | None:
    """``k`` training inputs of each expert's task (drawn apart from evaluation and LoraHub), or ``None``."""
    from expertkit.tasks.base import get_task

    if k == 0:
        return None
    out = []
    for e in library.experts:
        task = get_task(e.task)
        out.append([task.format_prompt(x) for x in task.examples("train", k, 10_000 + seed)])
    return out


def make_router(loaded: Any, library: ExpertLibrary, config: RouteConfig, *, embedder: Any = None,
                embedder_name: str = "minilm", writer: Any = None,
                cache_dir: str | os.PathLike[str] | None = None, max_new_tokens: int = 32) -> Router:
    """A :class:`Router` for ``config.method`` with its global router / embedder loaded when needed."""
    from expertkit.route.global_router import GlobalRouter, InstructionWriter

    needs_embedder = config.method in ("glider", "global", "retrieval")
    if needs_embedder and embedder is None:
        from expertkit.models.embedder import load_embedder

        embedder = load_embedder(embedder_name)
    global_router = None
    if config.method in ("glider", "global"):
        writer = writer or InstructionWriter(loaded, cache_dir=cache_dir or instruction_cache(),
                                             max_new_tokens=max_new_tokens)
        global_router = GlobalRouter(library.descriptions, writer, embedder,
                                     expert_queries=expert_inputs(library, config.expert_instructions, config.seed))
    return Router(loaded, library, config, global_router=global_router, embedder=embedder)


def evaluate_methods(loaded: Any, library: ExpertLibrary, methods: Sequence[str], tasks: Sequence[str], *,
                     n: int, split: str = "test", seed: int = 0, batch_size: int = 16,
                     base_config: RouteConfig | None = None, embedder: Any = None, writer: Any = None,
                     skip_oracle_held_out: bool = True) -> dict[str, dict[str, list[float]]]:
    """``{method: {task: per-example scores}}`` on the same ``n`` examples of each task for every method."""
    from expertkit.route.evaluate import evaluate_router
    from expertkit.tasks.base import get_task

    base_config = base_config or RouteConfig()
    if embedder is None and set(methods) & {"glider", "global", "retrieval"}:
        from expertkit.models.embedder import load_embedder

        embedder = load_embedder()  # once for every method that needs it
    if writer is None and set(methods) & {"glider", "global"}:
        from expertkit.route.global_router import InstructionWriter

        writer = InstructionWriter(loaded, cache_dir=instruction_cache())
    out: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        cfg = base_config.model_copy(update={"method": method})
        router = make_router(loaded, library, cfg, embedder=embedder, writer=writer)
        out[method] = {}
        for name in tasks:
            task = get_task(name)
            if method == "oracle" and skip_oracle_held_out and library.expert_for_task(name) is None:
                continue
            examples = task.examples(split, n, seed)
            out[method][name] = [r.score for r in evaluate_router(router, task, examples, batch_size=batch_size)]
    return out


def global_top1(router: Router, library: ExpertLibrary, tasks: Sequence[str], *, n: int, split: str = "test",
                seed: int = 0) -> dict[str, Any]:
    """Top-1 retrieval accuracy of the router's global scores on held-in queries (tasks with an expert):
    ``{"accuracy", "n", "per_task": {task: accuracy}, "hits": [0/1 per query]}``."""
    from expertkit.errors import ConfigError
    from expertkit.tasks.base import get_task

    if router.global_router is None:
        raise ConfigError("top-1 retrieval accuracy needs a router with a global router (glider or global).")
    hits: list[int] = []
    per_task = {}
    for name in tasks:
        idx = library.expert_for_task(name)
        if idx is None:
            continue
        task = get_task(name)
        scores, _ = router.global_router.scores([task.format_prompt(e) for e in task.examples(split, n, seed)])
        mine = [int(int(i) == idx) for i in scores.argmax(1)]
        per_task[name] = sum(mine) / len(mine)
        hits += mine
    if not hits:
        raise ConfigError("no held-in task among the given tasks: retrieval accuracy needs tasks with an expert.")
    return {"accuracy": sum(hits) / len(hits), "n": len(hits), "per_task": per_task, "hits": hits}
