"""docs/federated.md: the Python example runs as written and finds the replayed update."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_federated_doc_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "federated.md").read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[0], "docs/federated.md", "exec"), namespace)  # noqa: S102 - our own doc
    rejections = namespace["result"]["signing"]["rejections"]
    assert [(r["server_round"], r["client"]) for r in rejections] == [(2, "client-2")]
    assert "replay" in capsys.readouterr().out
