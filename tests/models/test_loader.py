"""load_model: local folders, bundled names, hub ids, pickles, unknown names."""

from __future__ import annotations

import shutil

import pytest
import torch

from expertkit.errors import CheckpointError, PickleRefusedError, UnknownNameError
from expertkit.models import load_model
from expertkit.models.tiny import tiny_model


def test_local_folder_loads_identical_weights(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    loaded = load_model(path)
    ref = tiny_model("llama")
    for name, tensor in ref.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.tokenizer is not None and loaded.fingerprint and loaded.path == path
    assert not loaded.model.training


def test_encoder_decoder_folder_loads_seq2seq(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint("t5"), with_tokenizer=False)
    assert loaded.model.config.is_encoder_decoder
    assert type(loaded.model).__name__ == "T5ForConditionalGeneration"


def test_pickle_folder_refused_then_allowed(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    dst = tmp_path / "pickled"
    shutil.copytree(src, dst)
    state = {k: v for k, v in tiny_model("llama").state_dict().items()}
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        load_model(dst)
    loaded = load_model(dst, allow_pickle=True, with_tokenizer=False)
    assert torch.equal(loaded.model.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_unknown_bundled_name_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'smollm2-135m'"):
        load_model("smollm2-13m")


def test_missing_relative_folder_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "nope"))


def test_hub_id_without_hub_is_clear(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="no local folder has that name"):
        load_model("someorg/somemodel")
