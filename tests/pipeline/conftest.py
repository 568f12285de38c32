"""Fixtures of the pipeline tests."""

from __future__ import annotations

import pytest

from expertkit.registry import Entry
from expertkit.tasks.base import TASKS, Task
from expertkit.tasks.toy import lohi_task


@pytest.fixture
def lohi(monkeypatch: pytest.MonkeyPatch) -> Task:
    """The toy lo-hi task, registered for the duration of one test."""
    import expertkit.tasks  # noqa: F401 - registers built-ins first

    task = lohi_task()
    monkeypatch.setitem(TASKS._entries, task.name, Entry(task.name, task, summary="toy"))
    return task
