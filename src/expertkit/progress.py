"""Progress display shared by the library and the CLI.

Long work shows a rich progress bar or spinner on stderr. ``set_quiet(True)``
(the CLI's ``--quiet``) or the environment variable ``EXPERTKIT_QUIET=1``
silences them, together with transformers' own bars.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
_state = {"quiet": os.environ.get("EXPERTKIT_QUIET", "") not in ("", "0")}
console = Console(stderr=True)


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress display, transformers' included."""
    _state["quiet"] = quiet
    try:
        from transformers.utils import logging as hf_logging

        (hf_logging.disable_progress_bar if quiet else hf_logging.enable_progress_bar)()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def is_quiet() -> bool:
    """Whether progress displays are silenced."""
    return _state["quiet"]


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=is_quiet(),
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar (silent when quiet)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with _progress() as prog:
        task = prog.add_task(description, total=total)
        for item in items:
            yield item
            prog.advance(task)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with a message for work of unknown length (silent when quiet)."""
    if is_quiet():
        yield
        return
    with console.status(message):
        yield


def note(message: str) -> None:
    """Print a short message on stderr unless quiet."""
    if not is_quiet():
        console.print(message)
