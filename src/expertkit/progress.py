"""Progress display shared by the library and the CLI.

Long work shows a rich progress bar or spinner on stderr. ``set_quiet(True)``
(the CLI's ``--quiet``) or the environment variable ``EXPERTKIT_QUIET=1``
silences them, together with transformers' own bars.
"""

from __future__ import annotations

import contextlib
import os
import sys
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
_state: dict[str, bool] = {"quiet": os.environ.get("EXPERTKIT_QUIET", "") not in ("", "0")}
console = Console(stderr=True)


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress display, transformers' included."""
    _state["quiet"] = quiet
    set_hf_bars(not quiet)


#: read by huggingface_hub (and so transformers) when imported; ``_state["hf_env"]`` is True while
#: :func:`set_hf_bars` is the one that set it (so it may take it back)
_HF_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"


def set_hf_bars(on: bool) -> None:
    """Switch transformers' (and huggingface_hub's) progress bars on or off without importing it.

    Importing transformers costs about a second, which commands that never use it (``expertkit
    merge``) should not pay. When it is already imported, its switch is flipped; otherwise
    ``HF_HUB_DISABLE_PROGRESS_BARS=1``, which transformers reads when it is imported, is set (or
    taken back when this function set it).
    """
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if on and _state.get("hf_env"):  # the variable we set earlier has priority in huggingface_hub
            os.environ.pop(_HF_ENV, None)
            _state["hf_env"] = False
            import importlib

            importlib.import_module("huggingface_hub.utils.tqdm").HF_HUB_DISABLE_PROGRESS_BARS = None
        (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
    elif not on:
        if _HF_ENV not in os.environ:
            os.environ[_HF_ENV] = "1"
            _state["hf_env"] = True
    elif _state.get("hf_env"):
        os.environ.pop(_HF_ENV, None)
        _state["hf_env"] = False


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
