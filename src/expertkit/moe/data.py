"""Training data of the MoE build: each cluster's task rows plus general text, in seeded batches.

A *row* is ``(prompt ids, target ids)`` as :mod:`expertkit.train.data` defines it (the loss covers
the target only). Task rows come from the train split of each of the cluster's tasks; general-text
rows are BBC News training articles cut into ``text_tokens``-token pieces whose first token is
the "prompt" and the rest the target (plain language modelling). Each batch holds
``round(batch_size * (1 - general_fraction))`` task rows (tasks in turn) and general text for the
rest; the draw is a pure function of (seed, cluster, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from expertkit.errors import ConfigError
from expertkit.moe.config import MoeBuildConfig
from expertkit.train.data import Row, encode_examples


@dataclass
class ClusterData:
    """Encoded rows of one cluster: per task, plus the general-text pool shared by all clusters."""

    name: str
    tasks: dict[str, list[Row]]
    text: list[Row]

    def batch(self, step: int, batch_size: int, general_fraction: float, seed: int, salt: int) -> list[Row]:
        """The rows of 0-based ``step`` (deterministic in every argument)."""
        rng = random.Random(f"{seed}:{salt}:{step}")
        n_text = round(batch_size * general_fraction) if self.text else 0
        names = sorted(self.tasks)
        rows = [rng.choice(self.tasks[names[(step * batch_size + i) % len(names)]])
                for i in range(batch_size - n_text)]
        rows += [rng.choice(self.text) for _ in range(n_text)]
        return rows


def text_rows(tokenizer: Any, text_tokens: int, split: str = "train", limit: int = 2000) -> list[Row]:
    """BBC News articles of ``split`` as language-modelling rows of ``text_tokens`` tokens."""
    from expertkit.tasks.bbc import split_articles

    docs = [text for items in split_articles(split).values() for _, text in items]
    rows: list[Row] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - text_tokens + 1, text_tokens):
            piece = ids[start:start + text_tokens]
            rows.append((piece[:1], piece[1:]))
        if len(rows) >= limit:
            break
    if not rows:
        raise ConfigError(f"no BBC article has {text_tokens} tokens; lower text_tokens.")
    return rows[:limit]


def cluster_data(tokenizer: Any, config: MoeBuildConfig, pool_per_task: int) -> list[ClusterData]:
    """Encoded rows of every cluster of ``config`` (``pool_per_task`` train examples per task)."""
    from expertkit.tasks.base import get_task

    text = text_rows(tokenizer, config.text_tokens) if config.general_text == "bbc" else []
    out = []
    for cluster in config.clusters:
        tasks = {}
        for name in cluster.tasks:
            task = get_task(name)
            if task.eval_only:
                raise ConfigError(f"cluster '{cluster.name}': task '{name}' is evaluation only (no train split); "
                                  "choose tasks with training data (`expertkit tasks list`).")
            examples = task.examples("train", pool_per_task, config.seed)
            tasks[name] = encode_examples(tokenizer, task, examples, config.max_prompt_tokens)
        out.append(ClusterData(cluster.name, tasks, text))
    return out


def cluster_prompts(config: MoeBuildConfig, n: int, split: str = "train") -> list[list[str]]:
    """``n`` formatted prompts per cluster (its tasks in turn): the router initialisation's input."""
    from expertkit.tasks.base import get_task

    out = []
    for cluster in config.clusters:
        per_task = max(1, -(-n // len(cluster.tasks)))
        prompts: list[str] = []
        for name in cluster.tasks:
            task = get_task(name)
            prompts += [task.format_prompt(e) for e in task.examples(split, per_task, config.seed + 1)]
        out.append(prompts[:n])
    return out


def mixture_batch(clusters: Sequence[ClusterData], step: int, batch_size: int, general_fraction: float,
                  seed: int) -> list[Row]:
    """A batch of the mixture of all clusters (router training): clusters in turn, then the same draw."""
    rng = random.Random(f"{seed}:mix:{step}")
    rows = []
    n_text = round(batch_size * general_fraction) if clusters[0].text else 0
    for i in range(batch_size - n_text):
        c = clusters[(step * batch_size + i) % len(clusters)]
        name = sorted(c.tasks)[rng.randrange(len(c.tasks))]
        rows.append(rng.choice(c.tasks[name]))
    rows += [rng.choice(clusters[0].text) for _ in range(n_text)]
    return rows
