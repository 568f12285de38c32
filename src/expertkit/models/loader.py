"""One entry point for every model source: ``load_model(source)``.

A source is a bundled name (``smollm2-135m``), a local Hugging Face folder
(safetensors; pickles refused unless ``allow_pickle``; a compressed-tensors quantized folder is
decompressed by :func:`expertkit.quant.storage.load_compressed`), or a hub id such as
``HuggingFaceTB/SmolLM2-135M-Instruct`` (works wherever a hub is reachable;
here it fails with a clear message because no hub can be reached).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import CheckpointError, unknown
from expertkit.models.bundled import BUNDLED, ensure_bundled

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and where it came from."""

    name: str
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any | None
    path: Path | None  # local folder (None for hub ids)
    fingerprint: str | None


def resolve(source: str | Path) -> tuple[str, Path | None]:
    """Map a source to ``(kind, local folder)``; kind is 'bundled', 'folder' or 'hub'."""
    text = str(source)
    if text in BUNDLED:
        return "bundled", ensure_bundled(text)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the model's folder (with config.json).")
        return "folder", path
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return "hub", None
    if "/" in text or text.startswith("."):
        raise CheckpointError(
            f"model folder not found: {text}. Pass an existing folder, a bundled name "
            f"({', '.join(BUNDLED)}) or a hub id like org/name."
        )
    raise unknown("model", text, list(BUNDLED))


def _model_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load a model (and its tokenizer, when the folder has one) from any source.

    Args:
        source: bundled name, local folder, or hub id.
        dtype: parameter dtype (fp32 by default: CPU training and evaluation).
        allow_pickle: allow ``.bin``/``.pt`` weights (loaded with weights_only=True).
        with_tokenizer: also load the tokenizer; a folder without one gives ``None``.
    """
    from transformers import AutoConfig, AutoTokenizer

    kind, folder = resolve(source)
    name = str(source) if kind != "folder" else Path(str(source)).name
    fp = None
    if folder is not None:
        from expertkit.weights.fingerprint import fingerprint
        from expertkit.weights.reader import Checkpoint

        with Checkpoint(folder, allow_pickle=allow_pickle) as ckpt:  # refuses pickles up front
            fp = fingerprint(ckpt)
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{folder} has no config.json; it is not a Hugging Face model folder.")
    target = str(folder) if folder is not None else str(source)
    compressed = False
    if folder is not None:
        from expertkit.quant.storage import is_compressed  # a light import: no torch work until used

        compressed = is_compressed(folder)
    try:
        config = AutoConfig.from_pretrained(target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if compressed:  # transformers 5.24 mis-reads mixed-precision MoE checkpoints: see docs/quant.md
                from expertkit.quant.storage import load_compressed as load_quantized

                model = load_quantized(folder, dtype=dtype)
            elif getattr(config, "expertkit_compressed_moe", None):  # fewer experts per layer: expertkit.moe.compressed
                from expertkit.moe.compressed import load_compressed

                model = load_compressed(target, config, dtype=dtype)
            else:
                model = _model_class(config).from_pretrained(
                    target, dtype=dtype, use_safetensors=not allow_pickle or None
                )
    except OSError as exc:
        if kind == "hub":
            raise CheckpointError(
                f"could not load '{source}': no local folder has that name, and the model hub "
                f"failed ({exc.__class__.__name__}). No hub is reachable from this machine: use a local folder or a bundled model "
                f"({', '.join(BUNDLED)})."
            ) from exc
        raise CheckpointError(f"could not load {target}: {exc}") from exc
    model.eval()
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(target)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, path=folder, fingerprint=fp)
