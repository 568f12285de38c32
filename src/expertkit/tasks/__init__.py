"""expertkit.tasks: the task suite (generated and bundled tasks), prompt formats and scoring.

Public API::

    from expertkit.tasks import get_task, all_tasks, export_lm_eval
    task = get_task("reverse_words")          # unknown names suggest the nearest one
    train = task.examples("train", 256, seed=0)  # deterministic, disjoint from validation/test
    task.format_prompt(train[0]), task.target(train[0])   # "...\\nAnswer:", " <answer>"
    task.score(example, prediction)           # in [0, 1]; trailing junk after the answer is ignored

Importing this package registers the built-in tasks (cheaply: no data is read and
reasoning-gym is imported only when examples are built). ``QUICKSTART_TASKS`` names the tasks
recommended for training experts in the quickstart.
"""

from expertkit.tasks.base import SPLITS, TASKS, Example, Split, Task, get_task, register_task
from expertkit.tasks.evaluate import EvalResult, evaluate
from expertkit.tasks.lmeval import export_lm_eval
from expertkit.tasks.stats import wilson_interval
from expertkit.tasks.suite import QUICKSTART_TASKS, all_tasks

__all__ = [
    "QUICKSTART_TASKS",
    "SPLITS",
    "TASKS",
    "EvalResult",
    "Example",
    "Split",
    "Task",
    "all_tasks",
    "evaluate",
    "export_lm_eval",
    "get_task",
    "register_task",
    "wilson_interval",
]
