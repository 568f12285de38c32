"""docs/route.md's example runs as written and prints what the page says."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "route.md"


def test_route_example_runs_and_prints_the_documented_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    text = DOC.read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    exec(compile(example, str(DOC), "exec"), {})  # noqa: S102 - our own doc
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"prints `{printed}`" in text
