"""Shared fixtures of the routing tests: tiny llama, hand-made LoRA experts, a fake embedder."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertkit.models.embedder import HashEmbedder
from expertkit.models.loader import LoadedModel
from expertkit.models.tiny import tiny_model, tiny_tokenizer
from expertkit.route.library import Expert, ExpertLibrary
from expertkit.weights.fingerprint import FINGERPRINT_METADATA_KEY

BASE_FP = "tinybase00000000"


def make_adapter(folder: Path, seed: int, *, fp: str = BASE_FP, modules=("q_proj", "v_proj"), r: int = 4) -> Path:
    """A random (non-zero) PEFT LoRA adapter on the tiny llama, recording base fingerprint ``fp``."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", seed=0)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(modules),
                                               init_lora_weights=False))
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_" in n:
                    p.mul_(3.0)  # big enough deltas that experts change the tiny model's outputs
        peft.save_pretrained(folder)
    weights = folder / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", FINGERPRINT_METADATA_KEY: fp})
    return folder


FakeEmbedder = HashEmbedder  # bag of words: each lower-cased word hashes to one of 64 dimensions


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    """Two hand-made experts on the tiny llama."""
    root = tmp_path_factory.mktemp("experts")
    return [make_adapter(root / f"e{i}", seed=10 + i) for i in range(2)]


@pytest.fixture
def loaded() -> LoadedModel:
    """The tiny llama (fingerprint BASE_FP) with the character tokenizer."""
    return LoadedModel("tiny", tiny_model("llama", seed=0), tiny_tokenizer(), None, BASE_FP)


@pytest.fixture
def library(adapters) -> ExpertLibrary:
    """Two experts, 'copy' and 'lohi', without gates."""
    return ExpertLibrary.from_adapters([
        Expert("copy", "copy-char", "repeat the character", adapters[0]),
        Expert("lohi", "lo-hi", "early or late letters", adapters[1]),
    ])
