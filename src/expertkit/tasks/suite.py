"""The built-in task suite: registers every bundled and generated task on import.

* 17 generated tasks from reasoning-gym (:mod:`expertkit.tasks.gym_tasks`),
* ``bbc_topic``: BBC News topic classification (:mod:`expertkit.tasks.bbc`),
* ``gsm8k``: GSM8K test problems, evaluation only (:mod:`expertkit.tasks.gsm8k`).

Importing this module reads no data and does not import reasoning-gym; examples are built on
demand. :func:`expertkit.tasks.base.get_task` imports it, so ``get_task(name)`` always sees
the built-in tasks.
"""

from __future__ import annotations

from expertkit.tasks.base import TASKS, Task, register_task
from expertkit.tasks.bbc import bbc_task
from expertkit.tasks.gsm8k import gsm8k_task
from expertkit.tasks.gym import gym_task
from expertkit.tasks.gym_tasks import SPECS

# Tasks a quickstart can train experts on: SmolLM2-135M-Instruct is weak on them zero-shot
# (test accuracy, n=60: family_relation 0.32, reverse_words 0.00, leg_count 0.00, bbc_topic 0.60)
# and a LoRA adapter learns them fast (40 steps of 16: family_relation 1.00, reverse_words 0.78).
# sort_words is NOT here: 40 LoRA steps left it at 0.02.
QUICKSTART_TASKS: tuple[str, ...] = ("family_relation", "reverse_words", "leg_count", "bbc_topic")


def _register_builtins() -> None:
    for spec in SPECS:
        if spec.name not in TASKS:
            register_task(gym_task(spec))
    for make in (bbc_task, gsm8k_task):
        task = make()
        if task.name not in TASKS:
            register_task(task)


_register_builtins()


def all_tasks() -> list[Task]:
    """Every registered task (built-ins included), sorted by name."""
    return [TASKS.get(name) for name in TASKS.names()]
