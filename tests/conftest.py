"""Shared pytest fixtures for the whole test suite.

Keep fixtures here small, documented and cheap; add new ones below the existing ones.

``tiny_checkpoint``
    Session-scoped factory: ``tiny_checkpoint(arch, seed=0) -> Path`` of a folder
    written by ``save_pretrained`` (``model.safetensors``, ``config.json``, and the
    tiny character tokenizer) for one of ``expertkit.models.tiny.TINY_ARCHS``. Each
    ``(arch, seed)`` is built once per session and shared, so treat the folder as
    read-only: copy it (``shutil.copytree``) before changing anything in it.

``lohi``
    The toy lo-hi task (:func:`expertkit.tasks.toy.lohi_task`), registered for one test.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from expertkit.models.tiny import save_tiny


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``(arch, seed=0) -> Path`` of a saved tiny model (shared, read-only)."""
    cache: dict[tuple[str, int], Path] = {}

    def make(arch: str, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in cache:
            cache[key] = save_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}-{seed}"), seed)
        return cache[key]

    return make


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], tuple[int, str, str]]:
    """Run the ``expertkit`` command in-process: ``cli(args) -> (exit code, stdout, stderr)``."""
    from expertkit.cli.main import main

    def run(args: list[str]) -> tuple[int, str, str]:
        code = 0
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def lohi(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The toy lo-hi task, registered for the duration of one test."""
    import expertkit.tasks  # noqa: F401 - registers built-ins first
    from expertkit.registry import Entry
    from expertkit.tasks.base import TASKS
    from expertkit.tasks.toy import lohi_task

    task = lohi_task()
    monkeypatch.setitem(TASKS._entries, task.name, Entry(task.name, task, summary="toy"))
    return task
