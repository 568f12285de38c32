"""PEFT LoRA adapters read as dense weight deltas (or as low-rank factors).

A PEFT adapter folder holds ``adapter_config.json`` and
``adapter_model.safetensors`` (``adapter_model.bin`` is a pickle, refused
unless ``allow_pickle=True``). For each adapted module the merged weight is::

    W' = W + scale * B @ A          # (out, r) @ (r, in) -> (out, in)

with ``scale = alpha / r`` (``alpha / sqrt(r)`` when ``use_rslora``), where
``r`` and ``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a key
matches the module, else from ``r`` / ``lora_alpha``. A pattern key ``k``
matches module name ``m`` (e.g. ``model.layers.0.self_attn.q_proj``) when the
regular expression ``(.*\\.)?(k)$`` matches ``m`` from its start; the first key
that matches, in the config's order, wins (PEFT's rule). With
``fan_in_fan_out`` (GPT-2's Conv1D stores ``(in, out)``) and for embedding
LoRA (``lora_embedding_A/B``) the product is transposed to the stored layout.
PEFT itself decides the transpose by the *module type* (Conv1D: yes, Linear:
no), overriding the config flag, so an adapter over both kinds carries a flag
that is right for only some modules; :meth:`LoraAdapter.align_to` settles each
module from the base tensor shapes (the config flag decides square ones).
``lora_bias`` adapters also add ``scale * lora_B.bias`` to the module's bias.

Adapter tensor names map to base names by dropping the ``base_model.model.``
prefix and the LoRA suffix: ``base_model.model.model.layers.0.self_attn.q_proj
.lora_A.weight`` adapts ``model.layers.0.self_attn.q_proj.weight``.

Every other tensor in the adapter is a **replacement**: a full tensor that
takes the place of the base tensor of the same name (after dropping the
``.base_layer`` / ``.modules_to_save`` infixes): ``modules_to_save`` modules,
biases trained with ``bias="all"``/``"lora_only"``, and embedding weights PEFT
saves with ``save_embedding_layers``. The merged model is: each tensor taken
from the replacements when present, else from the base, plus the delta when
present. This reproduces PEFT's ``merge_and_unload``.

Unsupported: DoRA (``use_dora``), peft types other than ``LORA``, and the LoRA
variants listed in :data:`UNSUPPORTED_OPTIONS`; each is refused with an error.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import CheckpointError, ConfigError
from expertkit.weights.fingerprint import FINGERPRINT_METADATA_KEY
from expertkit.weights.reader import Checkpoint

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
#: config options naming LoRA variants whose merge is not ``W + s * B @ A``.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales the merged weight by a learned magnitude",
    "use_qalora": "QA-LoRA pools inputs group-wise",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after invocation tokens",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing over several LoRAs",
    "kasa_config": "KaSA",
    "target_parameters": "LoRA on bare nn.Parameters (ParamWrapper)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron parallel linear layers",
}
_LORA_SUFFIXES = {
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_B.bias": ("bias", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}
_INFIXES = (".base_layer.", ".modules_to_save.", ".original_module.")


def match_pattern(patterns: dict[str, Any], module: str) -> str | None:
    """Return the first key of ``patterns`` that matches ``module`` the way PEFT does, or None.

    A key ``k`` matches when ``re.match(r"(.*\\.)?(k)$", module)`` succeeds, i.e.
    ``k`` (a regular expression) matches a dot-aligned suffix of the name.
    """
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as exc:
            raise ConfigError(f"pattern key '{key}' is not a valid regular expression ({exc}).") from exc
    return None


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are and how to scale them."""

    module: str  # base module name, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" or "embedding"
    r: int
    alpha: float
    scale: float
    transpose: bool  # the delta is (B @ A).T in the base tensor's layout
    a_name: str  # adapter tensor names
    b_name: str
    bias_name: str | None = None

    @property
    def weight_name(self) -> str:
        """Name of the base tensor the delta applies to."""
        return f"{self.module}.weight"

    @property
    def bias_target(self) -> str:
        """Name of the base bias that ``lora_B.bias`` adds to."""
        return f"{self.module}.bias"


def _strip(name: str) -> str:
    name = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    for infix in _INFIXES:
        name = name.replace(infix, ".")
    return name


class LoraAdapter:
    """A PEFT LoRA adapter folder, read lazily.

    Open with :meth:`open`; use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: Path, config: dict[str, Any], ckpt: Checkpoint) -> None:
        self.path = path
        self.config = config
        self._ckpt = ckpt
        self.modules: list[LoraModule] = []
        self._replacements: dict[str, str] = {}  # base name -> adapter tensor name
        self._index()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> LoraAdapter:
        """Open a PEFT adapter folder (``adapter_config.json`` + adapter weights).

        Raises :class:`CheckpointError` for a missing or corrupt folder,
        :class:`PickleRefusedError` for ``adapter_model.bin`` without
        ``allow_pickle``, :class:`ConfigError` for unsupported LoRA variants.
        """
        folder = Path(path)
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(
                f"{folder} is not a PEFT adapter folder: {CONFIG_NAME} is missing. "
                "Pass the folder written by PeftModel.save_pretrained."
            )
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({exc}).") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object.")
        check_supported(config, str(cfg_path))
        weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).exists()), None)
        if weights is None:
            raise CheckpointError(
                f"{folder} holds no adapter weights ({' or '.join(WEIGHT_NAMES)}). "
                "The adapter folder is incomplete; save it again."
            )
        ckpt = Checkpoint(weights, allow_pickle=allow_pickle)
        try:
            return cls(folder, config, ckpt)
        except BaseException:
            ckpt.close()
            raise

    def _index(self) -> None:
        parts: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        for name in self._ckpt.names():
            for suffix, (role, kind) in _LORA_SUFFIXES.items():
                if name.endswith(suffix):
                    module = _strip(name[: -len(suffix)])
                    parts.setdefault(module, {})[role] = name
                    kinds[module] = kind
                    break
            else:
                base_name = _strip(name)
                if any(p.startswith(("lora_", "token_adapter")) for p in base_name.split(".")):
                    raise ConfigError(
                        f"{self.path}: adapter tensor '{name}' belongs to a LoRA variant expertkit "
                        "does not support (only lora_A/lora_B/lora_embedding_A/B factors)."
                    )
                self._replacements[base_name] = name
        for module in sorted(parts):
            self.modules.append(self._module(module, kinds[module], parts[module]))

    def _module(self, module: str, kind: str, found: dict[str, str]) -> LoraModule:
        if "A" not in found or "B" not in found:
            missing = "lora_A" if "A" not in found else "lora_B"
            raise CheckpointError(f"{self.path}: module '{module}' has no {missing} tensor; the adapter is corrupt.")
        a_shape = self._ckpt.info(found["A"]).shape
        b_shape = self._ckpt.info(found["B"]).shape
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise ConfigError(
                f"{self.path}: module '{module}' has LoRA factors of shapes {list(a_shape)} and "
                f"{list(b_shape)}; only 2-D factors (linear and embedding layers) are supported, "
                "not convolution LoRA."
            )
        cfg = self.config
        r_key = match_pattern(cfg.get("rank_pattern") or {}, module)
        a_key = match_pattern(cfg.get("alpha_pattern") or {}, module)
        r = int(cfg["rank_pattern"][r_key]) if r_key is not None else int(cfg.get("r", 8))
        alpha = float(cfg["alpha_pattern"][a_key]) if a_key is not None else float(cfg.get("lora_alpha", 8))
        if a_shape[0] != r or b_shape[1] != r:
            raise CheckpointError(
                f"{self.path}: module '{module}' has rank {a_shape[0]} in its tensors but "
                f"{CONFIG_NAME} gives r={r}; the config does not belong to these weights."
            )
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        transpose = kind == "embedding" or bool(cfg.get("fan_in_fan_out"))
        return LoraModule(module, kind, r, alpha, scale, transpose, found["A"], found["B"], found.get("bias"))

    def align_to(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Decide each linear module's transpose from the base weight shapes.

        ``shapes`` maps base tensor names to shapes. A module whose product
        ``B @ A`` has shape ``(out, in)`` is transposed when the base weight is
        ``(in, out)`` (a Conv1D) and not when it is ``(out, in)``; square
        weights, and modules absent from ``shapes``, keep the config's flag.
        """
        for i, m in enumerate(self.modules):
            shape = shapes.get(m.weight_name)
            if m.kind != "linear" or shape is None:
                continue
            out_in = (self._ckpt.info(m.b_name).shape[0], self._ckpt.info(m.a_name).shape[1])
            if tuple(shape) == out_in[::-1] and out_in[0] != out_in[1]:
                self.modules[i] = replace(m, transpose=True)
            elif tuple(shape) == out_in and out_in[0] != out_in[1]:
                self.modules[i] = replace(m, transpose=False)

    # --------------------------------------------------------------- properties
    @property
    def target_modules(self) -> list[str]:
        """``target_modules`` from the config, as a sorted list (a regex string gives ``[regex]``)."""
        tm = self.config.get("target_modules") or []
        return [tm] if isinstance(tm, str) else sorted(tm)

    @property
    def base_model_name(self) -> str | None:
        """``base_model_name_or_path`` from the config (None when unset)."""
        return self.config.get("base_model_name_or_path")

    @property
    def base_fingerprint(self) -> str | None:
        """The base fingerprint recorded in the weights' metadata by expertkit, if any."""
        return self._ckpt.metadata.get(FINGERPRINT_METADATA_KEY)

    def replacement_names(self) -> list[str]:
        """Base tensor names that the adapter replaces outright."""
        return sorted(self._replacements)

    # ------------------------------------------------------------------ tensors
    def factors(self, *, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Yield ``(base_weight_name, A_scaled, B)`` with ``delta == B @ A_scaled``.

        The factors are in the **base tensor's layout** (fan-in-fan-out and
        embedding transposes already applied) and ``scale`` is folded into A:
        for a base tensor of shape ``(d0, d1)``, ``B`` is ``(d0, r)`` and
        ``A_scaled`` is ``(r, d1)``. ``lora_B.bias`` deltas are not factors;
        :meth:`deltas` yields them.
        """
        for m in self.modules:
            a = self._ckpt.read(m.a_name).to(dtype)  # (r, in)
            b = self._ckpt.read(m.b_name).to(dtype)  # (out, r)
            if m.transpose:
                # delta = s * (B @ A).T = A.T @ (s * B.T): (in, r) @ (r, out) -> (in, out)
                yield m.weight_name, (b.T * m.scale).contiguous(), a.T.contiguous()
            else:
                # delta = B @ (s * A): (out, r) @ (r, in) -> (out, in)
                yield m.weight_name, a * m.scale, b

    def deltas(self, *, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(base_tensor_name, dense delta)``, one module at a time.

        Weight deltas are ``scale * B @ A`` (transposed where the layout needs
        it), computed in ``dtype`` as PEFT does; ``lora_bias`` adapters also
        yield ``scale * lora_B.bias`` for the module's bias.
        """
        for m in self.modules:
            a = self._ckpt.read(m.a_name).to(dtype)  # (r, in)
            b = self._ckpt.read(m.b_name).to(dtype)  # (out, r)
            delta = (b @ a) * m.scale  # (out, r) @ (r, in) -> (out, in)
            yield m.weight_name, (delta.T.contiguous() if m.transpose else delta)
            if m.bias_name is not None:
                yield m.bias_target, self._ckpt.read(m.bias_name).to(dtype) * m.scale  # (out,)

    def bias_deltas(self, *, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(base_bias_name, scale * lora_B.bias)`` for ``lora_bias`` adapters only."""
        for m in self.modules:
            if m.bias_name is not None:
                yield m.bias_target, self._ckpt.read(m.bias_name).to(dtype) * m.scale  # (out,)

    def replacements(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(base_tensor_name, full tensor)`` for tensors the adapter replaces."""
        for base_name in sorted(self._replacements):
            yield base_name, self._ckpt.read(self._replacements[base_name])

    def close(self) -> None:
        """Close the adapter's weight file."""
        self._ckpt.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, modules={len(self.modules)}, replacements={len(self._replacements)})"


def check_supported(config: dict[str, Any], where: str = CONFIG_NAME) -> None:
    """Raise :class:`ConfigError` unless ``config`` is a plain LoRA that expertkit can merge."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ConfigError(
            f"{where}: peft_type is '{config.get('peft_type')}'; expertkit reads LORA adapters only. "
            "Merge this adapter with PEFT (merge_and_unload) and use the merged model instead."
        )
    for key, what in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise ConfigError(
                f"{where}: {key} is set: {what}, which expertkit does not support. "
                "Merge this adapter with PEFT (merge_and_unload) and use the merged model instead, "
                "or train a plain LoRA."
            )


def lora_delta(
    path: str | os.PathLike[str], *, allow_pickle: bool = False, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Return every dense delta of a PEFT LoRA adapter as ``{base_tensor_name: delta}``.

    Convenience over :meth:`LoraAdapter.deltas`; holds all deltas in memory.
    Replacements (``modules_to_save`` etc.) are not included; see
    :meth:`LoraAdapter.replacements`.
    """
    with LoraAdapter.open(path, allow_pickle=allow_pickle) as adapter:
        return dict(adapter.deltas(dtype=dtype))
