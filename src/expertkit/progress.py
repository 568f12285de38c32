"""Progress display shared by the library and the CLI.

Long work shows a rich progress bar or spinner on stderr. ``set_quiet(True)``
(the CLI's ``--quiet``) or the environment variable ``EXPERTKIT_QUIET=1``
silences them, together with transformers' own bars and other tqdm bars. Only public
switches are used (environment variables the libraries document, and transformers'
``enable_progress_bar`` / ``disable_progress_bar``); no module of theirs is patched.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
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
    """Silence (or re-enable) every progress display, transformers' and tqdm's included."""
    _state["quiet"] = quiet
    set_hf_bars(not quiet)
    _set_env(_TQDM_ENV, quiet, "tqdm")


#: public switches read when the library is imported: huggingface_hub's (transformers asks it for
#: its default) and tqdm's (``TQDM_DISABLE``: tqdm's default for ``disable``, e.g. for the bar
#: transformers' GGUF reader draws with tqdm directly)
_HF_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"
_TQDM_ENV = "TQDM_DISABLE"


def _set_env(name: str, on: bool, module: str) -> None:
    """Set the switch ``name=1`` while ``module`` is not imported yet (it reads it at import), or
    take back the one set here (for child processes); a value the user set is left alone."""
    if on and name not in os.environ and module not in sys.modules:
        os.environ[name] = "1"
        _state[name] = True
    elif not on and _state.get(name):
        os.environ.pop(name, None)
        _state[name] = False


def set_hf_bars(on: bool) -> None:
    """Switch transformers' progress bars on or off through public switches, without importing it.

    Importing transformers costs about a second, which commands that never use it (``expertkit
    merge``) should not pay. When it is already imported, ``transformers.utils.logging``'s
    ``enable_progress_bar`` / ``disable_progress_bar`` are called; otherwise
    ``HF_HUB_DISABLE_PROGRESS_BARS=1``, which transformers reads when it is imported, is set (or
    taken back when this module set it). huggingface_hub gives that variable priority over its own
    switch, so once it was read, huggingface_hub's download bars stay off (there is no hub here);
    transformers' bars follow the switch.
    """
    _set_env(_HF_ENV, not on, "huggingface_hub")
    if "transformers" in sys.modules:
        import warnings

        from transformers.utils import logging as hf_logging

        with warnings.catch_warnings():  # huggingface_hub warns that the variable has priority
            warnings.simplefilter("ignore")
            (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()


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


@contextlib.contextmanager
def loss_bar(description: str, total: int, completed: int = 0) -> Iterator[Callable[[float], None]]:
    """A progress bar with the running loss (silent when quiet); yields ``advance(loss)``."""
    columns = (
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=is_quiet()) as prog:
        task = prog.add_task(description, total=total, completed=completed, loss="-")
        yield lambda loss: prog.update(task, advance=1, loss=f"{loss:.4f}")


@contextlib.contextmanager
def job_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """One progress bar for a stage's jobs (silent when quiet); yields ``update(done=0, note=None)``,
    which advances by ``done`` finished jobs and shows ``note`` (e.g. retries) after the description."""
    with _progress() as prog:
        task = prog.add_task(description, total=total)

        def update(done: int = 0, note: str | None = None) -> None:
            prog.update(task, advance=done, description=f"{description} {note}" if note else description)

        yield update
