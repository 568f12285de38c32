"""A patch as a PEFT LoRA adapter for a (new) base: exact for low-rank patches, SVD otherwise.

LoRA patches store ``delta = B @ A`` per tensor in the base tensor's layout. The adapter written
here has ``lora_alpha = r`` (PEFT's scaling ``alpha / r = 1``) and every module padded with zero
rows/columns to the largest rank, so ``B_peft @ A_peft`` is exactly ``scale * delta``:

* linear layers (``(out, in)`` weights): ``lora_A = A`` ``(r, in)``, ``lora_B = scale * B`` ``(out, r)``;
* embeddings and GPT-2 ``Conv1D`` (layouts that PEFT transposes): ``lora_embedding_A = B.T``,
  ``lora_embedding_B = scale * A.T`` (resp. ``lora_A``/``lora_B`` with ``fan_in_fan_out``).

Dense deltas (task vectors of full fine-tunes) are factored by a truncated SVD at ``rank``;
the relative residual ``||delta - delta_r||_F / ||delta||_F`` of each tensor is returned so users
see what the adapter leaves out. Deltas that are not matrices (norm weights, biases) and
full-tensor replacements cannot be LoRA factors: they are refused with an explanation unless
``skip_non_matrix`` is set, in which case they are listed as skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from expertkit.errors import ConfigError
from expertkit.fileio import staged_folder
from expertkit.weights.patch import Patch

PREFIX = "base_model.model."


def _roles(names: list[str], config: dict[str, Any] | None) -> dict[str, Any]:
    import warnings

    from expertkit.weights.arch import describe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return describe(names, config).roles


def low_rank_factors(
    patch: Patch, *, scale: float, rank: int, skip_non_matrix: bool = False
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float], list[str]]:
    """``({name: (A, B)}, residuals, skipped)`` with ``B @ A = scale * delta`` (exact or rank-``rank`` SVD)."""
    if rank < 1:
        raise ConfigError(f"rank must be at least 1, got {rank}.")
    not_matrix = sorted(n for n, d in patch.deltas.items() if d.dim() != 2) + sorted(patch.replacements)
    if not_matrix and not skip_non_matrix:
        raise ConfigError(
            f"{len(not_matrix)} patched tensors are not matrices or are full replacements "
            f"({', '.join(not_matrix[:4])}{' ...' if len(not_matrix) > 4 else ''}); a LoRA adapter cannot hold them. "
            "Apply the patch densely (without --as-adapter), or pass --skip-non-matrix to leave them out knowingly."
        )
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    residuals: dict[str, float] = {}
    for name, (a, b) in patch.factors.items():
        factors[name] = (a.float(), scale * b.float())
        residuals[name] = 0.0
    for name, delta in patch.deltas.items():
        if delta.dim() != 2:
            continue
        d = scale * delta.double()  # (d0, d1)
        u, sv, vh = torch.linalg.svd(d, full_matrices=False)
        r = min(rank, sv.numel())
        root = sv[:r].sqrt()
        factors[name] = ((root[:, None] * vh[:r]).float(), (u[:, :r] * root[None, :]).float())
        total = float(sv.square().sum())
        residuals[name] = math.sqrt(float(sv[r:].square().sum()) / total) if total > 0 else 0.0
    return factors, residuals, not_matrix


def write_adapter(
    patch: Patch, out_dir: Path, *, base_name: str, base_config: dict[str, Any] | None, scale: float,
    rank: int = 16, skip_non_matrix: bool = False,
) -> dict[str, Any]:
    """Write ``patch`` (times ``scale``) as a PEFT LoRA adapter folder; return residuals and skipped names."""
    from peft import LoraConfig

    factors, residuals, skipped = low_rank_factors(patch, scale=scale, rank=rank, skip_non_matrix=skip_non_matrix)
    if not factors:
        raise ConfigError("the patch has no matrix deltas to express as a LoRA adapter.")
    roles = _roles(list(factors), base_config)
    r = max(a.shape[0] for a, _ in factors.values())
    tensors: dict[str, torch.Tensor] = {}
    targets, fan_in_fan_out = [], set()
    for name, (a, b) in sorted(factors.items()):
        if not name.endswith(".weight"):
            raise ConfigError(f"patched tensor {name} is not a module weight; a LoRA adapter cannot hold it.")
        module = name[: -len(".weight")]
        pad = r - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a  # (r, d1)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b  # (d0, r)
        role = roles[name]
        if role.group == "embedding":
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = b.T.contiguous()  # (r, vocab)
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = a.T.contiguous()  # (hidden, r)
        elif role.fan_in_fan_out:
            fan_in_fan_out.add(True)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = b.T.contiguous()  # (r, in)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = a.T.contiguous()  # (out, r)
        else:
            fan_in_fan_out.add(False)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()  # (r, in)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()  # (out, r)
        targets.append(module)
    if len(fan_in_fan_out) > 1:
        raise ConfigError("the patch mixes Conv1D (fan_in_fan_out) and Linear layers; write two adapters instead.")
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0, bias="none",
        fan_in_fan_out=bool(fan_in_fan_out and fan_in_fan_out.pop()), task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    with staged_folder(out_dir) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"rank": r, "residuals": residuals, "skipped": skipped,
            "max_residual": max(residuals.values(), default=0.0)}
