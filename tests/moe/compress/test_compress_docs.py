"""docs/moe_compress.md's example runs as written and prints what the page says."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "moe_compress.md"


def test_compress_example_runs_and_prints_the_documented_counts(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    text = DOC.read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    exec(compile(example, str(DOC), "exec"), {})  # noqa: S102 - our own doc
    printed = capsys.readouterr().out.strip()
    assert f"prints `{printed}`" in text
    before, after = (int(x) for x in printed.split()[:2])
    assert before == 2 * 4 * 3 * 64 * 128 and after <= 0.2 * before
