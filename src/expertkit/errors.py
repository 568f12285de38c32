"""The expertkit error hierarchy.

Every error a user can cause by bad input is an :class:`ExpertkitError`. Each
subclass also derives from the builtin exception that fits (``ValueError``,
``TypeError``, ``OSError``, ``KeyError`` semantics via ``LookupError``), so
callers that catch builtins keep working. Messages say what was wrong and what
to do about it. The CLI prints them on one line and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ExpertkitError(Exception):
    """Base of every user-facing expertkit error."""

    exit_code = 2


class ConfigError(ExpertkitError, ValueError):
    """A configuration file or value is invalid."""


class CheckpointError(ExpertkitError, OSError):
    """A checkpoint folder or file cannot be read or written."""


class PickleRefusedError(CheckpointError):
    """A pickle checkpoint was found and pickles were not allowed."""


class IncompatibleModelsError(ExpertkitError, ValueError):
    """Two models (or a model and a delta) cannot be combined."""


class UnknownNameError(ExpertkitError, LookupError):
    """A name (task, model, method, architecture, tensor) is not known."""

    def __str__(self) -> str:  # LookupError/KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InputTypeError(ExpertkitError, TypeError):
    """An argument has the wrong type."""


def suggest(name: str, choices: Iterable[str], n: int = 1) -> str:
    """Return ``" Did you mean 'x'?"`` for the nearest choice, or ``""``."""
    matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not matches:
        return ""
    if len(matches) == 1:
        return f" Did you mean '{matches[0]}'?"
    return " Did you mean one of: " + ", ".join(f"'{m}'" for m in matches) + "?"


def unknown(kind: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """Build an :class:`UnknownNameError` that names the choices and the nearest one."""
    choices = sorted(choices)
    listing = ", ".join(choices[:20]) + (" ..." if len(choices) > 20 else "")
    return UnknownNameError(
        f"unknown {kind} '{name}'.{suggest(name, choices)} Known {kind}s: {listing or '(none)'}."
    )
