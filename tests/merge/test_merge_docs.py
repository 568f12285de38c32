"""docs/merge.md's Python example runs as written (tiny models, about a second)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_merge_doc_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "merge.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/merge.md", "exec"), {})  # noqa: S102 - our own doc
    assert (tmp_path / "merge-demo" / "merged" / "config.json").exists()
