"""Model-level mixture: a sequence-level router that picks one whole model per prompt.

:class:`SequenceRouter` embeds a prompt (by default with the bundled MiniLM sentence embedder,
unit-normalised) and picks the model whose *centroid* is most cosine-similar; a model's centroid
is the normalised mean embedding of the prompts of the tasks it serves. Models need not share an
architecture: each runs alone on the prompts routed to it.

:func:`evaluate_routed` scores the routed system on a task: the examples are routed, each
model is evaluated (with :func:`expertkit.tasks.evaluate`) on exactly the examples routed to
it, and the scores are combined per example in the original order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import CheckpointError, ConfigError
from expertkit.fileio import write_atomic

Embed = Callable[[Sequence[str]], torch.Tensor]  # prompts -> (n, dim)
ROUTER_FILE = "router.json"


def minilm_embed(name: str = "minilm") -> Embed:
    """An embedding function over the bundled sentence embedder (unit-norm rows)."""
    from expertkit.models.embedder import load_embedder

    model = load_embedder(name)

    def embed(prompts: Sequence[str]) -> torch.Tensor:
        """``(n, dim)`` unit-norm embeddings."""
        return torch.as_tensor(model.encode(list(prompts), normalize_embeddings=True, show_progress_bar=False))

    return embed


class SequenceRouter:
    """Nearest-centroid routing of whole prompts to models (see the module docstring)."""

    def __init__(self, names: Sequence[str], centroids: torch.Tensor, embedder: str = "minilm") -> None:
        if centroids.ndim != 2 or centroids.shape[0] != len(names):
            raise ConfigError(f"need one centroid per model: {len(names)} names, centroids {list(centroids.shape)}.")
        self.names = list(names)
        self.centroids = centroids / centroids.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (E, D)
        self.embedder = embedder

    @classmethod
    def fit(cls, names: Sequence[str], prompts: Sequence[Sequence[str]], embed: Embed,
            embedder: str = "minilm") -> SequenceRouter:
        """Centroids from each model's prompts (``prompts[i]`` belong to ``names[i]``)."""
        if len(names) != len(prompts) or any(not p for p in prompts):
            raise ConfigError("give a non-empty list of prompts for every model.")
        cents = []
        for group in prompts:
            e = embed(group).float()  # (n, D)
            e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cents.append(e.mean(0))
        return cls(names, torch.stack(cents), embedder)

    def scores(self, prompts: Sequence[str], embed: Embed) -> torch.Tensor:
        """``(n, E)`` cosine similarity of each prompt to each centroid."""
        e = embed(prompts).float()
        e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return e @ self.centroids.T  # (n, D) @ (D, E) -> (n, E)

    def route(self, prompts: Sequence[str], embed: Embed) -> list[int]:
        """The index of the chosen model for each prompt (first on ties)."""
        return [int(i) for i in self.scores(prompts, embed).argmax(dim=1)]

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``router.json`` (names, centroids, embedder) atomically into ``folder``."""
        path = Path(folder) / ROUTER_FILE
        write_atomic(path, json.dumps({"kind": "sequence-router", "embedder": self.embedder, "names": self.names,
                                       "centroids": self.centroids.tolist()}))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> SequenceRouter:
        """Read a router written by :meth:`save`."""
        path = Path(folder) / ROUTER_FILE
        try:
            data = json.loads(path.read_text())
            return cls(data["names"], torch.tensor(data["centroids"]), data.get("embedder", "minilm"))
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: not a readable sequence router ({exc}).") from exc


def evaluate_routed(models: Sequence[Any], router: SequenceRouter, task: Any, embed: Embed, *,
                    split: str = "test", n: int = 100, seed: int = 0, batch_size: int = 16) -> dict[str, Any]:
    """Accuracy of the routed system on ``task`` and how often each model was chosen.

    ``models[i]`` is a :class:`~expertkit.models.LoadedModel` for ``router.names[i]``.
    """
    from expertkit.tasks import evaluate, get_task

    task = get_task(task) if isinstance(task, str) else task
    examples = task.examples(split, n, seed)
    picks = router.route([task.format_prompt(e) for e in examples], embed)
    scores = [0.0] * len(examples)
    for k, model in enumerate(models):
        idx = [i for i, p in enumerate(picks) if p == k]
        if not idx:
            continue
        subset = [examples[i] for i in idx]
        sub = dataclasses.replace(task, build=lambda _s, _n, _seed, subset=subset: subset)
        res = evaluate(model, None, sub, split=split, n=len(subset), seed=seed, batch_size=batch_size)
        for i, s in zip(idx, res.scores, strict=True):
            scores[i] = s
    counts = {name: picks.count(k) for k, name in enumerate(router.names)}
    return {"task": task.name, "n": len(examples), "accuracy": sum(scores) / len(scores), "routed": counts,
            "scores": scores}
