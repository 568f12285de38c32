"""docs/merge.md's Python example runs as written (tiny models, about a second) and its merge has
the values TIES defines, computed here by hand."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from expertkit.weights import Checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _sd(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as ck:
        return dict(ck.iter_tensors())


def _ties_by_hand(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], density: float,
                  lam: float) -> torch.Tensor:
    """TIES from the paper's three steps: top-k trim (k = int(density n)), elected sign, disjoint mean."""
    trimmed = []
    for m in models:
        d = (m - base).reshape(-1)
        keep = torch.topk(d.abs(), max(1, int(density * d.numel()))).indices
        t = torch.zeros_like(d)
        t[keep] = d[keep]
        trimmed.append(t)
    sign = torch.sign(sum(w * t for w, t in zip(weights, trimmed, strict=True)))
    sign[sign == 0] = 1
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for w, t in zip(weights, trimmed, strict=True):
        agree = torch.sign(w * t) == sign
        num += torch.where(agree, w * t, 0.0)
        den += torch.where(agree, w, 0.0)
    merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
    return base + lam * merged.reshape(base.shape)


def test_merge_doc_example_runs_and_gives_the_ties_values(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "merge.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/merge.md", "exec"), {})  # noqa: S102 - our own doc
    work = tmp_path / "merge-demo"
    base, a, b, out = (_sd(work / n) for n in ("model0", "model1", "model2", "merged"))
    # the example: weights 0.6 / 0.4, density 0.3, lambda [0.5, 1.0] over the 2 layers
    for name, lam in [("model.layers.0.mlp.up_proj.weight", 0.5), ("model.layers.1.self_attn.q_proj.weight", 1.0),
                      ("model.embed_tokens.weight", 0.5)]:
        expect = _ties_by_hand(base[name], [a[name], b[name]], [0.6, 0.4], 0.3, lam)
        torch.testing.assert_close(out[name], expect, atol=1e-6, rtol=0, msg=name)
        assert not torch.allclose(out[name], base[name])  # the merge did move the weights
