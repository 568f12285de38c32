"""``expertkit tasks``: list the task suite, show examples, export to lm-eval.

Wired into the main app by :func:`register` (found by ``expertkit.cli.main``). Each command parses its
arguments and calls one library function; errors are :class:`~expertkit.errors.ExpertkitError`
and are printed by the main entry point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

tasks_app = typer.Typer(
    help="The task suite: generated reasoning tasks, BBC News topics, GSM8K.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(soft_wrap=True)


def _size(value: int | None) -> str:
    """A split size for display: ``generated`` for unlimited, ``-`` for none."""
    if value is None:
        return "generated"
    return str(value) if value else "-"


@tasks_app.command("list")
def list_cmd(
    family: Annotated[str | None, typer.Option(help="Only tasks of this family.")] = None,
) -> None:
    """List the registered tasks: name, family, kind, source, license and size per split."""
    from expertkit.errors import unknown
    from expertkit.tasks import QUICKSTART_TASKS, all_tasks

    tasks = all_tasks()
    if family is not None:
        families = {t.family for t in tasks}
        if family not in families:
            raise unknown("task family", family, families)
        tasks = [t for t in tasks if t.family == family]
    title = f"{len(tasks)} tasks (* = recommended for quickstart experts)"
    rows = []
    for task in tasks:
        size = task.size or {}
        sizes = [_size(size.get(split)) for split in ("train", "validation", "test")]
        rows.append({
            "name": task.name + (" *" if task.name in QUICKSTART_TASKS else ""), "family": task.family,
            "kind": task.kind + (" (eval only)" if task.eval_only else ""), "source": task.source,
            "license": task.license, "train": sizes[0], "validation": sizes[1], "test": sizes[2],
            "examples": "generated" if set(sizes) == {"generated"} else "/".join(sizes),
        })
    _print_table(title, rows)


def _table(title: str, rows: list[dict[str, str]], columns: tuple[str, ...]) -> Table:
    """A table of ``columns``. Identifiers never wrap; prose (kind, license) wraps between words,
    and only ``source``, the one long identifier, may be folded when nothing else fits."""
    table = Table(title=title)
    for column in columns:
        if column in ("kind", "license"):
            table.add_column(column)  # wraps between words
        elif column == "source":
            table.add_column(column, overflow="fold", min_width=12)
        else:
            table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    return table


def _print_table(title: str, rows: list[dict[str, str]]) -> None:
    """All columns when they fit, or when the output is not a terminal (then nothing wraps: a row
    per line, for grep); on a narrow terminal, the columns that fit whole, and where the rest is."""
    from rich.measure import Measurement

    wide = _table(title, rows, ("name", "family", "kind", "source", "license", "train", "validation", "test"))
    natural = Measurement.get(out, out.options.update(width=10_000), wide).maximum
    if not out.is_terminal:
        Console(width=natural, soft_wrap=True).print(wide)
    elif natural <= out.width:
        out.print(wide)
    else:
        narrow = _table(title, rows, ("name", "family", "kind", "examples"))
        narrow.caption = ("examples: train/validation/test; source and license: 'expertkit tasks show NAME' "
                          "or a wider terminal")
        out.print(narrow)


@tasks_app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="Task name (see `expertkit tasks list`).")],
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="How many examples.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the examples.")] = 0,
) -> None:
    """Print a task's description and ``n`` examples of a split (prompt, target, choices)."""
    from expertkit.tasks import get_task

    task = get_task(name)
    out.print(f"[bold]{task.name}[/bold] ({task.family}, {task.kind}): {task.description}", highlight=False)
    out.print(f"source: {task.source}; license: {task.license}; max_new_tokens: {task.max_new_tokens}",
              highlight=False)
    for i, example in enumerate(task.examples(split, n, seed), 1):
        out.rule(f"{split} example {i}")
        out.print(task.format_prompt(example), markup=False, highlight=False)
        out.print(f"target: {task.target(example)!r}", markup=False, highlight=False)
        if example.choices:
            out.print(f"choices: {', '.join(example.choices)}", markup=False, highlight=False)


@tasks_app.command("export")
def export_cmd(
    name: Annotated[str, typer.Argument(help="Task name.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the task YAML and JSONL data.")],
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="How many examples.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the examples.")] = 0,
) -> None:
    """Export a task split as an lm-evaluation-harness local task (YAML + JSONL)."""
    from expertkit.tasks import export_lm_eval

    path = export_lm_eval(name, out_dir, split=split, n=n, seed=seed)
    out.print(f"wrote {path} (run: lm_eval --include_path {out_dir} --tasks expertkit_{name} ...)",
              markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``expertkit tasks`` to the main app."""
    app.add_typer(tasks_app, name="tasks")
