"""Public and private parts of a task's training data, so that non-private steps stay honest.

DP-Flat's teacher, the choice of sparse prefix layers and any tuning may look only at **public**
data; the DP student trains on the **private** part. :func:`privacy_split` draws
``n_public + n_private`` training examples once (``task.examples("train", ..., seed)``) and cuts
them into two disjoint lists, offered as two derived tasks (``<task>@public``,
``<task>@private``) whose train split is that list and whose validation and test splits are the
task's own (asking the train split for more examples than the part has gives the whole part, as
with any finite task). Members for membership inference are the private list; non-members come from the test
split, which neither part touches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from expertkit.errors import ConfigError
from expertkit.tasks.base import Example, Task


@dataclass(frozen=True)
class PrivacySplit:
    """The two derived tasks and their training examples."""

    public: Task
    private: Task
    public_examples: tuple[Example, ...]
    private_examples: tuple[Example, ...]


def _part(task: Task, part: str, examples: tuple[Example, ...]) -> Task:
    def build(split: str, n: int, seed: int) -> list[Example]:
        if split != "train":
            return task.examples(split, n, seed)
        return list(examples[:n])  # all of them when more are asked for, like any finite task

    return dataclasses.replace(task, name=f"{task.name}@{part}", build=build,
                               size={**task.size, "train": len(examples)},
                               description=f"{task.description} ({part} part of the training data)")


def privacy_split(task: Task, n_public: int, n_private: int, seed: int = 0) -> PrivacySplit:
    """Disjoint public and private training parts of ``task`` (see the module docstring)."""
    if n_public < 1 or n_private < 1:
        raise ConfigError(f"both parts need at least one example; got n_public={n_public}, n_private={n_private}.")
    drawn = task.examples("train", n_public + n_private, seed)
    if len(drawn) < n_public + n_private:
        raise ConfigError(f"task '{task.name}' has {len(drawn)} training examples; "
                          f"{n_public} public + {n_private} private were asked for.")
    public, private = tuple(drawn[:n_public]), tuple(drawn[n_public:n_public + n_private])
    return PrivacySplit(_part(task, "public", public), _part(task, "private", private), public, private)
