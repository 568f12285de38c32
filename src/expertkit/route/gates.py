"""Local routers: Phatgoose gate vectors, trained per expert after the expert, with the expert frozen.

For one expert, every adapted linear layer gets a gate vector ``g`` (``in_features``, started at 0)
and computes ``base(x) + sigmoid(g . x) * B A x``. Only the gates train (AdamW), on the expert's own
task with the training loss of :mod:`expertkit.train.data` (target tokens only); base and LoRA
factors stay frozen. At routing time the gates and the token inputs are standardised
(:mod:`expertkit.route.layers`), so a gate points at the inputs its expert helps with.

The gates are written to one safetensors file per expert whose metadata records the base
fingerprint and the identity of the run (adapter hash, task, config, and the base's
:func:`~expertkit.weights.fingerprint.model_digest`: every byte, since the sampled fingerprint
cannot tell apart two bases that differ only in tensors it does not read); a finished file with
the same identity is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from expertkit.config import Config
from expertkit.errors import ConfigError

IDENTITY_KEY = "expertkit.gate_identity"


class GateConfig(Config):
    """How the gate vectors of one expert are trained (Phatgoose: frozen expert, gates only)."""

    steps: int = Field(40, ge=1, description="optimizer steps per expert")
    lr: float = Field(1e-2, gt=0, description="AdamW learning rate of the gates")
    batch_size: int = Field(8, ge=1, description="examples per step")
    seed: int = Field(0, description="seed of the data draw and order")
    max_prompt_tokens: int = Field(256, ge=1, description="longer prompts keep their last tokens")


class _GatedLinear(nn.Module):
    """``base(x) + sigmoid(g . x) * B A x`` with only ``g`` trainable."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("a", a, persistent=False)  # (r, in), scale folded in
        self.register_buffer("b", b, persistent=False)  # (out, r)
        self.gate = nn.Parameter(torch.zeros(a.shape[1], dtype=a.dtype))  # (in,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen layer plus the gated expert; ``x`` is ``(..., in)``."""
        g = torch.sigmoid(x @ self.gate)[..., None]  # (..., 1)
        return self.base(x) + g * ((x @ self.a.T) @ self.b.T)  # (..., out)


def gate_identity(adapter: str | os.PathLike[str], task: str, config: GateConfig, base_digest: str | None) -> str:
    """A string that changes whenever the expert's weights, its task, the gate config or the base change
    (``base_digest``: the base's :func:`~expertkit.weights.fingerprint.model_digest`)."""
    from expertkit.fileio import sha256_file

    weights = sha256_file(Path(adapter) / "adapter_model.safetensors")
    return json.dumps({"adapter": weights, "task": task, "config": config.model_dump(mode="json"),
                       "base_digest": base_digest}, sort_keys=True)


def finished_gates(path: Path, identity: str) -> bool:
    """Whether ``path`` holds gates trained with exactly ``identity``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(IDENTITY_KEY) == identity
    except (OSError, ValueError):
        return False


def train_gates(loaded: Any, adapter: str | os.PathLike[str], task: Any, out: str | os.PathLike[str],
                config: GateConfig | None = None, *, base_digest: str | None = None) -> dict[str, Any]:
    """Train the gate vectors of the expert in ``adapter`` on ``task``; write them to ``out``.

    ``loaded`` is the base as a :class:`~expertkit.models.LoadedModel` (its layers are swapped for
    the run and put back). ``base_digest`` is its :func:`~expertkit.weights.fingerprint.model_digest`
    when the caller has it already (computed here otherwise). Returns ``{"path", "losses", "reused"}``.
    """
    from safetensors.torch import save_file

    from expertkit.fileio import fsync_path, temp_sibling, writing
    from expertkit.tasks.base import get_task
    from expertkit.train.data import batch_indices, encode_examples, make_loss_fn
    from expertkit.weights.fingerprint import FINGERPRINT_METADATA_KEY, model_digest
    from expertkit.weights.lora import LoraAdapter

    config = config or GateConfig()
    task = get_task(task) if isinstance(task, str) else task
    out = Path(out)
    ident = gate_identity(adapter, task.name, config, base_digest or model_digest(loaded.model))
    if finished_gates(out, ident):
        return {"path": out, "losses": [], "reused": True}
    model, tok = loaded.model, loaded.tokenizer
    with LoraAdapter.open(adapter) as ad:
        factors = {name[: -len(".weight")]: (a, b) for name, a, b in ad.factors()}
    train = task.examples("train", config.steps * config.batch_size, config.seed)
    if not train:
        raise ConfigError(f"task '{task.name}' gave no training examples for the gates.")
    rows = encode_examples(tok, task, train, config.max_prompt_tokens)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    swapped: list[tuple[nn.Module, str, nn.Module, _GatedLinear]] = []
    losses: list[float] = []
    try:
        for module, (a, b) in factors.items():
            parent_name, _, child = module.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = getattr(parent, child)
            gated = _GatedLinear(layer, a.to(layer.weight.dtype), b.to(layer.weight.dtype))
            setattr(parent, child, gated)
            swapped.append((parent, child, layer, gated))
        for p in model.parameters():
            p.requires_grad_(False)
        params = [g.gate for *_, g in swapped]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for step in range(config.steps):
                batch = [rows[i] for i in batch_indices(step, config.batch_size, len(rows), config.seed)]
                loss = make_loss_fn(model, tok, batch)().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        gates = {name: gated.gate.detach().clone() for (_, _, _, gated), name in zip(swapped, factors, strict=True)}
    finally:
        for parent, child, layer, _ in swapped:
            setattr(parent, child, layer)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
        model.eval()
    meta = {IDENTITY_KEY: ident, FINGERPRINT_METADATA_KEY: loaded.fingerprint or "", "format": "pt",
            "losses": json.dumps(losses)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = temp_sibling(out)
    try:
        tmp = tmp_dir / out.name
        with writing(out):
            save_file(gates, str(tmp), metadata=meta)
        fsync_path(tmp)
        os.replace(tmp, out)  # a finished file or none: never a half-written one
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"path": out, "losses": losses, "reused": False}


def digest(text: str) -> str:
    """A short hex digest of ``text`` (cache keys)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
