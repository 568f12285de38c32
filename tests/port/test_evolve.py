"""expertkit evolve on a tiny model: a loadable, documented, different model; the parent untouched."""

from __future__ import annotations

import json

import pytest
import torch

from expertkit.errors import CheckpointError, ConfigError
from expertkit.models.loader import load_model
from expertkit.models.tiny import save_tiny
from expertkit.port.evolve import corpus_documents, evolve, token_blocks
from expertkit.weights.reader import Checkpoint


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(40)))
    return path


def test_corpus_documents_and_blocks(corpus, tmp_path):
    docs = corpus_documents(corpus)
    assert len(docs) == 40 and docs[0].startswith("document 0")
    tok = load_model(save_tiny("llama", tmp_path / "m")).tokenizer
    blocks = token_blocks(tok, docs, 16)
    total = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert blocks.shape == (total // 16, 16)
    assert int(blocks[0, 0]) == tok("d", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ConfigError, match="not found"):
        corpus_documents(tmp_path / "missing.txt")


def test_evolve_writes_a_new_version_with_a_model_card(corpus, tmp_path):
    parent = load_model(save_tiny("llama", tmp_path / "parent"))
    before = {k: v.clone() for k, v in parent.model.state_dict().items()}
    res = evolve(parent, tmp_path / "v2", corpus=corpus, steps=8, lr=1e-3, batch_size=2, seq_len=16)
    assert all(torch.equal(before[k], v) for k, v in parent.model.state_dict().items())  # parent untouched
    assert len(res.losses) == 8 and res.losses[-1] < res.losses[0]
    meta = json.loads((res.path / "expertkit.json").read_text())
    assert meta["kind"] == "evolved" and meta["parent_fingerprint"] == parent.fingerprint and meta["steps"] == 8
    assert "continued causal-LM pretraining" in (res.path / "README.md").read_text()
    child = load_model(res.path)
    assert child.fingerprint != parent.fingerprint and child.tokenizer is not None
    with Checkpoint(res.path) as ckpt:
        moved = [n for n in ckpt.names() if not torch.equal(ckpt.read(n), before[n])]
    assert len(moved) > 0.9 * len(ckpt.names())
    with pytest.raises(CheckpointError, match="exists"):
        evolve(parent, tmp_path / "v2", corpus=corpus, steps=1)
