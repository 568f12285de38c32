"""Toy tasks for tests on tiny models (not registered): trivially learnable, deterministic by seed.

* ``copy_task()``: ``"c:"`` -> ``"c"`` (generate; repeat the character).
* ``lohi_task()``: three letters from a-e are ``"lo"``, from v-z ``"hi"`` (choice).

:func:`register_smoke_task` registers lo-hi for the ``--smoke`` runs of the experiments.
"""

from __future__ import annotations

import random

from expertkit.tasks.base import Example, Task

_SPLIT_OFFSET = {"train": 0, "validation": 1, "test": 2}


def _rng(split: str, seed: int) -> random.Random:
    return random.Random(seed * 10 + _SPLIT_OFFSET[split])


def exact(example: Example, prediction: str) -> float:
    """1.0 when the stripped prediction equals the answer."""
    return float(prediction.strip() == example.answer)


def _copy_build(split: str, n: int, seed: int) -> list[Example]:
    rng = _rng(split, seed)
    return [Example(f"{c}:", c) for c in (rng.choice("abcdefghij") for _ in range(n))]


def _lohi_build(split: str, n: int, seed: int) -> list[Example]:
    rng = _rng(split, seed)
    out = []
    for _ in range(n):
        label = rng.choice(["lo", "hi"])
        pool = "abcde" if label == "lo" else "vwxyz"
        out.append(Example("".join(rng.choice(pool) for _ in range(3)) + ":", label, ("lo", "hi")))
    return out


def copy_task() -> Task:
    """Generate task: repeat the character before the colon."""
    return Task("copy-char", "toy", "generate", "test", "MIT", "repeat the character", _copy_build, exact,
                max_new_tokens=3)


def lohi_task() -> Task:
    """Choice task: early letters are 'lo', late letters 'hi'."""
    return Task("lo-hi", "toy", "choice", "test", "MIT", "early or late letters", _lohi_build, exact)


def register_smoke_task() -> str:
    """Register the lo-hi task in this process unless a task of that name is there; its name.

    The experiments' ``--smoke`` runs call it in the driver and in each cell (a Ray worker is a
    fresh process, where the toy task is not registered).
    """
    import expertkit.tasks  # noqa: F401 - registers the built-in tasks first
    from expertkit.tasks.base import TASKS

    task = lohi_task()
    if task.name not in TASKS:
        TASKS.add(task.name, task, summary="toy (smoke run)")
    return task.name
