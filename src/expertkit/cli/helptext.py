"""Help texts without reStructuredText markup.

Docstrings and registry metadata are written for Sphinx-style readers (``literal``,
:class:`~pkg.Name`); a terminal shows that markup raw. :func:`plain` turns it into plain text
and :func:`clean_help` applies it to every command, group and parameter of the CLI.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click

#: ``:role:`~pkg.mod.Name``` (shown as ``Name``), ``:role:`pkg.Name``` and ``:role:`text <target>```
_ROLE = re.compile(r":[\w:.-]+:`(~?)([^`<]*?)\s*(?:<[^`>]*>)?`")
_LITERAL = re.compile(r"``(.+?)``|`([^`\s][^`]*?)`")


def _role(match: re.Match[str]) -> str:
    text = match.group(2)
    return text.rsplit(".", 1)[-1] if match.group(1) else text


def plain(text: str | None) -> str | None:
    """``text`` without reStructuredText roles, literals and escapes (``x`` and `x` become 'x')."""
    if not text:
        return text
    text = _ROLE.sub(_role, text)
    text = _LITERAL.sub(lambda m: f"'{m.group(1) or m.group(2)}'", text)
    text = text.replace("\\ ", "")
    return "\n\n".join(_unwrap(p) for p in text.split("\n\n"))


def _unwrap(paragraph: str) -> str:
    """Join the lines of a wrapped prose paragraph (the terminal wraps it again); keep lists and
    indented blocks as they are."""
    lines = paragraph.strip("\n").split("\n")
    if any(line[:1].isspace() or line.lstrip().startswith(("* ", "- ")) for line in lines):
        return paragraph
    return " ".join(line.strip() for line in lines)


def clean_help(command: click.Command) -> None:
    """Strip the markup from the help of ``command``, its parameters and all its sub-commands."""
    command.help = plain(command.help)
    command.short_help = plain(command.short_help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = plain(param.help)  # type: ignore[attr-defined]
    for sub in getattr(command, "commands", {}).values():
        clean_help(sub)


def print_entries(console: Any, registry: Any, kind: Callable[[Any], str] | None = None) -> None:
    """List a registry's entries and their declared parameters (default, or "required"), without
    markup in the texts and without rich markup in the values."""
    from rich.markup import escape

    from expertkit.config import default_text

    for entry in registry:
        label = f" ({kind(entry)})" if kind is not None else ""
        console.print(f"[bold]{escape(entry.name)}[/bold]{label}: {escape(plain(entry.summary) or '')}", highlight=False)
        if entry.params is None:
            continue
        for name, field in entry.params.model_fields.items():
            console.print(f"    {escape(name)} ({escape(default_text(field))}): {escape(plain(field.description) or '')}",
                          highlight=False)
