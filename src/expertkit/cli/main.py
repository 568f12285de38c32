"""Entry point of the ``expertkit`` command.

Exit status, decided here once for every command:

* 0 on success; a command that returns an int, or raises ``typer.Exit(code)``, exits with that
  code (``expertkit fl client`` passes on the SuperNode's);
* 2 for user errors (:class:`~expertkit.errors.ExpertkitError`) and for operating-system errors
  (read-only file system, disk full, file-size limit, a parent path that is a file): one line,
  no traceback; ``--debug`` (or ``EXPERTKIT_DEBUG=1``) shows the traceback instead;
* 130 after Ctrl-C, with one line.

Help texts come from docstrings and registry metadata written in reStructuredText; the
``expertkit`` help shows them without the markup (:func:`expertkit.cli.helptext.plain`).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.text import Text

from expertkit import __version__
from expertkit.errors import ExpertkitError
from expertkit.progress import set_quiet

app = typer.Typer(
    name="expertkit",
    help="Train, merge, route, port and compress expert models built on one pretrained transformer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _add_subcommands() -> None:
    """Every ``expertkit/cli/*_cmd.py`` module contributes through ``register(app)``.

    A new command group is one new file; this module is not edited. Command modules keep their
    heavy imports (torch, transformers, flwr) inside the command functions so that ``expertkit
    --help`` stays fast.
    """
    import importlib
    import pkgutil

    import expertkit.cli as cli_pkg

    for info in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda m: m.name):
        if info.name.endswith("_cmd"):
            module = importlib.import_module(f"expertkit.cli.{info.name}")
            module.register(app)


_add_subcommands()
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _hf_bars_off() -> None:
    """transformers' own bars (weight loading, shard writing) are noise next to ours.

    Lazily: transformers is not imported here (about 1 s of start-up that ``expertkit merge`` never needs).
    """
    from expertkit.progress import set_hf_bars

    set_hf_bars(False)


@app.callback()
def _global(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status messages.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """expertkit: the toolkit for a zoo of expert models."""
    set_quiet(quiet)
    _hf_bars_off()


@app.command()
def version() -> None:
    """Print the expertkit version."""
    out.print(__version__)


@app.command()
def info(
    checkpoint: Annotated[str, typer.Argument(help="checkpoint folder, .safetensors file or bundled model name")],
    allow_pickle: Annotated[bool, typer.Option(help="Allow .bin/.pt weights (loaded with weights_only=True).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Architecture, parameter count, dtypes, tensor groups and size on disk of a checkpoint."""
    from expertkit.weights.summary import checkpoint_summary, print_summary

    path = Path(checkpoint)
    if not path.exists():
        from expertkit.models.loader import resolve

        _, folder = resolve(checkpoint)
        path = folder if folder is not None else path
    summary = checkpoint_summary(path, allow_pickle=allow_pickle)
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        print_summary(summary, out)


#: other config files a user may hand to `validate`: (key that marks them, what they are, loader, how to run)
_OTHER_CONFIGS = (
    ("merge_method", "a merge config", "expertkit.merge.config:load_merge_config", "expertkit merge {} OUT"),
    ("clusters", "a zoo plan", "expertkit.merge.zoo.plan:load_plan", "expertkit zoo build {} OUT"),
    ("clients", "a federated-learning config", "expertkit.federated.config:load_fl_config",
     "expertkit fl simulate {}"),
)


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="a config YAML (run, merge, zoo plan or federated)")]) -> None:
    """Check a config without loading any weights; every problem is reported at once.

    A run config (``stages:``) is checked as such; a merge config (``merge_method:``), a zoo plan
    (``clusters:``) or a federated config (``clients:``) is recognised by its key and checked
    against its own schema.
    """
    import importlib

    from expertkit.config import load_yaml
    from expertkit.pipeline import load_run_config

    data = load_yaml(config)
    if isinstance(data, dict) and "stages" not in data:
        for key, what, loader, how in _OTHER_CONFIGS:
            if key in data:
                module, func = loader.split(":")
                getattr(importlib.import_module(module), func)(config)
                out.print(f"[green]ok[/green]: {config} is valid as {what}; run it with '{how.format(config)}'.")
                return
    run = load_run_config(config)
    out.print(f"[green]ok[/green]: {config} is valid: run '{run.config.name}' on {run.config.model}, "
              f"{len(run.stages)} stage(s): {', '.join(s.name for s in run.stages)}.")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="a run config YAML, e.g. examples/quickstart.yaml")],
    output_dir: Annotated[Path | None, typer.Option(help="Folder for runs (default: the config's output_dir).")] = None,
    force: Annotated[bool, typer.Option(help="Redo finished stages instead of reusing them.")] = False,
    executor: Annotated[str | None, typer.Option(
        help="Where a stage's independent jobs run: local (this process) or ray (default: the config's).")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (host:port, or 'auto'); without it a local Ray is started.")] = None,
    max_retries: Annotated[int | None, typer.Option(
        help="Retries of a failed or killed job on Ray (default: the config's, 2).")] = None,
) -> None:
    """Run a pipeline config; finished stages are reused, so an interrupted run resumes.

    With --executor ray the jobs of train_experts (one per task) and evaluate (one per model and
    task) run as Ray tasks; the run folder must be on a path every node reaches (docs/pipeline.md).
    """
    from expertkit.pipeline import load_run_config, run_pipeline
    from expertkit.pipeline.executor import ExecutorConfig

    run = load_run_config(config)
    update = {k: v for k, v in {"kind": executor, "address": address, "max_retries": max_retries}.items()
              if v is not None}
    if address is not None and executor is None:
        update["kind"] = "ray"
    chosen = None
    if update:
        from pydantic import ValidationError

        from expertkit.config import config_error, error_lines

        try:
            chosen = ExecutorConfig.model_validate({**run.config.executor.model_dump(), **update})
        except ValidationError as exc:
            raise config_error("options", error_lines(exc, ExecutorConfig, prefix=("--executor options",))) from None
    run_dir = run_pipeline(run, output_dir=output_dir, force=force, executor=chosen)
    out.print(f"[green]done[/green]: report at {run_dir / 'report.md'}")


@app.command()
def stages() -> None:
    """List the pipeline stage kinds and their parameters."""
    import expertkit.pipeline.stages  # noqa: F401
    from expertkit.cli.helptext import print_entries
    from expertkit.pipeline import STAGES

    print_entries(out, STAGES)


#: what to do about an operating-system error, by errno
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free space or write somewhere else",
    errno.EFBIG: "the file-size limit (ulimit -f) is smaller than this file",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EACCES: "check the permissions of the path",
    errno.EPERM: "check the permissions of the path",
}


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = ""
    if exc.filename is not None:
        where = f": {os.fsdecode(exc.filename)}"
        if exc.filename2 is not None:
            where += f" -> {os.fsdecode(exc.filename2)}"
    hint = _OS_HINTS.get(exc.errno or 0)
    return f"{what}{where}" + (f" ({hint})." if hint else ".")


def _exit_code(value: object) -> int:
    """The exit status for a command's return value: an int is the status, anything else is 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: exit codes and one-line errors as the module docstring says."""
    from expertkit.cli.helptext import clean_help

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("EXPERTKIT_DEBUG", "") not in ("", "0")
    command = typer.main.get_command(app)
    clean_help(command)
    try:
        # make_context + invoke instead of command.main(): typer's main turns Ctrl-C into a plain
        # return value of 130 and drops the messages; here every outcome is handled below.
        with command.make_context("expertkit", args) as ctx:
            code = _exit_code(command.invoke(ctx))
    except ExpertkitError as exc:
        if debug:
            raise
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # the reader went away (`expertkit tasks list | head`): not an error to report
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing left to flush at exit
            sys.exit(1)
        if debug:
            raise
        err.print(Text.assemble(("error: ", "bold red"), os_error_line(exc)), soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("interrupted: nothing half-written was left; commands that resume (run, train) "
                  "continue where they stopped when run again.", soft_wrap=True)
        sys.exit(130)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
