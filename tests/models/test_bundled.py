"""The bundled SmolLM2-135M-Instruct: converted once into the cache, verified, rebuilt when corrupt."""

from __future__ import annotations

import shutil

import pytest
import torch

from expertkit.models import bundled
from expertkit.models.bundled import MARKER, ensure_bundled
from expertkit.weights.reader import Checkpoint

pytestmark = pytest.mark.bundled


def test_bundled_cache_is_complete_and_answers():
    from expertkit.models import load_model

    folder = ensure_bundled("smollm2-135m")
    assert (folder / MARKER).exists() and (folder / "tokenizer.json").exists()
    with Checkpoint(folder) as ckpt:
        assert ckpt.num_parameters == 134_515_008
    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    good = ensure_bundled("smollm2-135m")
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path))
    copy = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(good, copy)
    assert ensure_bundled("smollm2-135m") == copy  # a valid copy is reused as is
    (copy / "model.safetensors").write_bytes(b"truncated")  # an interrupted copy
    assert not bundled._cache_is_valid(copy, bundled.BUNDLED["smollm2-135m"].source_path())
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        rebuilt = ensure_bundled("smollm2-135m")
    with Checkpoint(rebuilt) as a, Checkpoint(good) as b:
        assert a.names() == b.names()
        assert torch.equal(a.read("model.norm.weight"), b.read("model.norm.weight"))
    assert not any(p.name.startswith(".smollm2-135m.tmp") for p in (tmp_path / "models").iterdir())


def test_bundled_embedder_ranks_related_text_higher():
    from expertkit.models import load_embedder

    emb = load_embedder("minilm")
    vecs = emb.encode(["add two numbers", "compute the sum of 3 and 4", "the cat sat on the mat"],
                      normalize_embeddings=True, convert_to_tensor=True)
    assert vecs.shape == (3, 384)
    sims = vecs[0] @ vecs[1:].T
    assert sims[0] > sims[1]
