"""docs/newton.md's Python example runs as written and trains."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_newton_doc_example_runs() -> None:
    text = (ROOT / "docs" / "newton.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict = {}
    exec(compile(block, "docs/newton.md", "exec"), namespace)  # noqa: S102 - our own docs
    losses, d = namespace["losses"], namespace["d"]
    assert losses[-1] < losses[0] - 0.5
    assert d.chosen == "quantum" and d.d <= 64  # row_keep 0.25 on the 256-parameter block, or smaller blocks
    assert "ran classically" in d.reason
