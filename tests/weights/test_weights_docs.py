"""docs/weights.md's re-sharding example runs as written and gives the shards it prints."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "weights.md"


def test_resharding_example_runs(capsys) -> None:
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)]
    example = next(b for b in blocks if "reuse_buffer=True" in b)
    exec(compile(example, str(DOC), "exec"), {})  # noqa: S102 - our own doc
    assert capsys.readouterr().out.strip() == \
        "['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']"
