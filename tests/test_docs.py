"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bundled
def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "out" / "smollm2-half-mlp" / "model.safetensors.index.json").exists()
    from expertkit.weights import Checkpoint

    model = namespace["model"].model
    name = "model.layers.0.mlp.up_proj.weight"
    with Checkpoint(namespace["folder"]) as base:
        expected = base.read(name) * 0.5
    assert torch.equal(model.state_dict()[name], expected)
