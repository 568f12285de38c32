"""Calibration: the Hessian ``H = sum_t x_t x_t^T`` of every quantization target's inputs, expert-balanced.

Plain linears (attention, dense MLPs, shared experts) get a forward pre-hook that adds their input.
Experts are fed from the routers: a :class:`~expertkit.moe.routing.RoutingTap` hands over each
router's input, logits and chosen experts (the same events the routing statistics count), and for
every expert the tokens routed to it are run through that expert's first projections here, giving
the Hessian of its input (gate/up) and of its intermediate activation (down). So each expert's
Hessian sees exactly its routed tokens.

**Expert balance.** Natural routing gives rare experts few tokens, and an expert that saw none would
be quantized blind. With ``min_tokens_per_expert = N``, every expert that was routed fewer than ``N``
real tokens over the whole pass gets the missing ones added: the tokens with the highest router logit
for that expert among those not routed to it (a running top-``N`` kept per expert across batches), i.e.
the tokens it would most plausibly have seen. :class:`Calibration` reports, per MoE layer and expert,
the routed and the added tokens. An expert still without tokens (``N = 0``) is quantized by
round-to-nearest and listed as such.

Only layers in ``layers`` (``(stack, layer)`` keys) get Hessians, so they can be gathered a chunk of
layers at a time when memory is short (later chunks then see the inputs of the already quantized
earlier layers, as sequential GPTQ does); the routed-token counts cover every MoE layer on every pass.
"""

from __future__ import annotations

import contextlib

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from expertkit.errors import CheckpointError, ConfigError
from expertkit.quant.targets import Target, takes_hidden

FORMAT = "expertkit-calibration-v1"

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids (B, T), attention_mask (B, T))


@dataclass
class Calibration:
    """Summed input outer products per Hessian key, and how many tokens went into each."""

    hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> (cols, cols) float32
    tokens: dict[str, int] = field(default_factory=dict)
    routed: dict[str, list[int]] = field(default_factory=dict)  # experts module -> tokens routed per expert
    added: dict[str, list[int]] = field(default_factory=dict)  # experts module -> tokens added for balance

    def add(self, key: str, x: torch.Tensor) -> None:
        """Accumulate ``x`` ``(n, cols)``."""
        if x.shape[0] == 0:
            return
        x = x.detach().float()
        gram = x.T @ x  # (cols, cols)
        if key in self.hessians:
            self.hessians[key] += gram
        else:
            self.hessians[key] = gram
        self.tokens[key] = self.tokens.get(key, 0) + int(x.shape[0])

    def merge(self, other: Calibration) -> None:
        """Take over ``other``'s keys (disjoint chunks of layers)."""
        self.hessians.update(other.hessians)
        self.tokens.update(other.tokens)
        self.routed.update(other.routed)
        self.added.update(other.added)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the Hessians (safetensors) and the token counts (in its metadata), atomically."""
        from safetensors.torch import save_file

        from expertkit.fileio import fsync_path

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        meta = {"format": FORMAT, "tokens": self.tokens, "routed": self.routed, "added": self.added}
        try:
            save_file({k: v.contiguous() for k, v in self.hessians.items()}, str(tmp),
                      metadata={"expertkit": json.dumps(meta)})
            fsync_path(tmp)  # on disk before it takes the name (convention: temp, fsync, rename)
            os.replace(tmp, path)
            fsync_path(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read what :meth:`save` wrote."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("expertkit", "{}"))
                hessians = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read calibration Hessians {path}: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not expertkit calibration Hessians.")
        return cls(hessians, meta["tokens"], meta["routed"], meta["added"])

    def expert_report(self) -> dict[str, dict[str, list[int]]]:
        """Per MoE layer (experts module): tokens routed to each expert and tokens added to balance."""
        return {k: {"routed": self.routed[k], "added": self.added.get(k, [0] * len(self.routed[k]))}
                for k in self.routed}


class _ExpertSink:
    """RoutingTap sink: expert Hessians from routed tokens, plus the reserve for balancing."""

    def __init__(self, model: Any, tap: Any, calib: Calibration, wanted: set[str], reserve: int,
                 layers: set[tuple[str | None, int]] | None) -> None:
        names = {id(m): n for n, m in model.named_modules()}
        self.experts = {key: (names[id(mods[1])], mods[1]) for key, mods in tap.layers.items()}
        self.calib, self.wanted, self.reserve, self.layers = calib, wanted, reserve, layers
        self.num_experts = dict(tap.layer_experts)  # per layer: a compressed MoE's layers may differ
        self.pool: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (scores (R,), hidden (R, H))
        for key, (name, _m) in self.experts.items():
            calib.routed.setdefault(name, [0] * self.num_experts[key])

    def __call__(self, event: Any) -> None:
        name, module = self.experts[event.key]
        hidden, real = event.hidden, event.mask  # (N, H), (N,)
        collect = (self.layers is None or event.key in self.layers) and bool(self.wanted)
        for e in range(self.num_experts[event.key]):
            routed = (event.chosen[:, e] > 0) & real
            n = int(routed.sum())
            self.calib.routed[name][e] += n  # every layer is counted on every pass
            if n and collect:
                self._add(name, module, e, hidden[routed])
            if self.reserve and collect:
                self._keep(name, e, event.logits[:, e][real & ~routed], hidden[real & ~routed])

    def _add(self, name: str, module: Any, e: int, x: torch.Tensor) -> None:
        for part, value in expert_inputs(module, e, x).items():
            key = f"{name}[{e}].{part}"
            if key in self.wanted:
                self.calib.add(key, value)

    def _keep(self, name: str, e: int, scores: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep the ``reserve`` best-scored unrouted tokens seen so far for expert ``e``."""
        if scores.numel() == 0:
            return
        old = self.pool.get((name, e))
        if old is not None:
            scores, hidden = torch.cat([old[0], scores]), torch.cat([old[1], hidden])
        top = torch.topk(scores, min(self.reserve, scores.numel())).indices
        self.pool[(name, e)] = (scores[top].clone(), hidden[top].clone())

    def balance(self, minimum: int) -> None:
        """Add reserve tokens to every expert (of the collected layers) routed fewer than ``minimum`` tokens."""
        for key, (name, module) in self.experts.items():
            if not self.wanted or (self.layers is not None and key not in self.layers):
                continue
            added = [0] * self.num_experts[key]
            for e in range(self.num_experts[key]):
                missing = minimum - self.calib.routed[name][e]
                pool = self.pool.get((name, e))
                if missing <= 0 or pool is None:
                    continue
                x = pool[1][:missing]  # highest router logits first
                self._add(name, module, e, x)
                added[e] = int(x.shape[0])
            self.calib.added[name] = added


@torch.no_grad()
def expert_inputs(experts: Any, e: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of expert ``e``'s projections for tokens ``x`` ``(n, H)``: ``{"in": (n, H), "mid": (n, I)}``.

    Fused experts (3-D parameters, transformers 5) use the module's own gate (``_apply_gate``);
    unfused experts (one submodule per expert) are run and their linears' inputs read by hooks.
    """
    gate_up = getattr(experts, "gate_up_proj", None)
    if isinstance(gate_up, torch.Tensor) and gate_up.ndim == 3:
        if getattr(experts, "is_transposed", False):
            raise ConfigError(f"{type(experts).__name__}: transposed fused experts are not supported for quantization.")
        h = F.linear(x, gate_up[e])  # (n, 2I)
        bias = getattr(experts, "gate_up_proj_bias", None)
        if isinstance(bias, torch.Tensor):
            h = h + bias[e]
        mid = experts._apply_gate(h) if getattr(experts, "has_gate", True) else experts.act_fn(h)
        return {"in": x, "mid": mid}
    child = _expert_child(experts, e)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for sub, mod in child.named_modules():
        if isinstance(mod, torch.nn.Linear):
            part = "in" if takes_hidden(sub.rsplit(".", 1)[-1], mod.in_features, x.shape[-1]) else "mid"
            handles.append(mod.register_forward_pre_hook(
                lambda m, inp, part=part: seen.__setitem__(part, inp[0].reshape(-1, inp[0].shape[-1]))))
    try:
        child(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _expert_child(experts: Any, e: int) -> Any:
    for name, child in experts.named_children():
        if re.fullmatch(rf"\D*{e}", name):
            return child
    raise ConfigError(f"{type(experts).__name__}: no submodule for expert {e} (expected a child named like 'expert_{e}').")


class _Mask:
    """Holds the current batch's attention mask for the plain linear hooks (a forward_batches watcher)."""

    mask: torch.Tensor | None = None


def _linear_hook(calib: Calibration, key: str, state: _Mask):
    def hook(_module: Any, inputs: tuple[Any, ...]) -> None:
        x = inputs[0]
        x = x.reshape(-1, x.shape[-1])  # (N, cols)
        mask = state.mask
        if mask is not None and mask.numel() == x.shape[0]:
            x = x[mask.reshape(-1).bool()]
        calib.add(key, x)

    return hook


@torch.no_grad()
def calibrate(model: Any, batches: Sequence[Batch], targets: Iterable[Target], *, min_tokens_per_expert: int = 0,
              layers: set[tuple[str | None, int]] | None = None, observers: Sequence[Any] = (),
              description: str = "Calibrating", stop_after: str | None = None) -> Calibration:
    """Hessians of ``targets``' inputs over ``batches`` (one forward pass each), expert-balanced.

    ``observers`` (e.g. :class:`~expertkit.quant.scorers.BlockImportance`) ride along on the same
    passes: each has ``attach(model) -> handles`` and a ``mask`` attribute set before every batch.
    ``stop_after`` names a submodule (e.g. the last decoder layer that has targets, see
    :func:`last_layer`) after which each pass ends: the layers after it and the vocabulary head are not
    run, so routed-token counts then cover only the layers up to it.
    """
    from expertkit.moe.routing import NotAnMoeError, RoutingTap, forward_batches

    targets = [t for t in targets if layers is None or t.layer_key in layers]
    if not batches:
        raise ConfigError("calibration needs at least one batch of tokens.")
    if min_tokens_per_expert < 0:
        raise ConfigError(f"min_tokens_per_expert must be >= 0, not {min_tokens_per_expert}.")
    calib, state, handles = Calibration(), _Mask(), []
    plain = {t.hessian for t in targets if t.expert is None}
    for key in sorted(plain):
        handles.append(model.get_submodule(key).register_forward_pre_hook(_linear_hook(calib, key, state)))
    expert_keys = {t.hessian for t in targets if t.expert is not None}
    sink = tap = None
    try:  # every MoE's routers are tapped: expert Hessians, and the routed-token counts of every layer
        tap = RoutingTap(model)
        sink = tap.sink = _ExpertSink(model, tap, calib, expert_keys, min_tokens_per_expert, layers)
    except NotAnMoeError:
        if expert_keys:
            raise
    for observer in observers:
        handles += observer.attach(model)
    try:
        with tap if tap is not None else contextlib.nullcontext():
            forward_batches(model, batches, description,
                            watchers=[state, *observers, *([tap] if tap is not None else [])],
                            stop_at=model.get_submodule(stop_after) if stop_after else None)
    finally:
        for h in handles:
            h.remove()
    if sink is not None:
        sink.balance(min_tokens_per_expert)
    return calib


def last_layer(model: Any, targets: Iterable[Target], layers: set[tuple[str | None, int]] | None = None) -> str | None:
    """Name of the decoder layer (a child of an ``nn.ModuleList``) holding the last of ``targets``' layers
    (among ``layers``), or ``None`` when the targets span several stacks (an encoder and a decoder: the
    order the layers run in is then not their key order) or no such layer module is found."""
    chosen = [t for t in targets if layers is None or t.layer_key in layers]
    if not chosen or len({t.stack for t in chosen}) != 1:
        return None
    last = max(t.layer for t in chosen)
    names = set()
    for t in (t for t in chosen if t.layer == last):
        parts = t.param.split(".")
        for j, part in enumerate(parts[:-1]):
            if part == str(last) and j and isinstance(model.get_submodule(".".join(parts[:j])), torch.nn.ModuleList):
                names.add(".".join(parts[:j + 1]))
                break
        else:
            return None
    return names.pop() if len(names) == 1 else None


def expert_token_table(calib: Calibration) -> np.ndarray:
    """``(MoE layers, experts)`` tokens each expert's Hessian saw (routed + added); a compressed layer with
    fewer experts has zeros in the columns past its own."""
    rows = [np.add(r, calib.added.get(k, [0] * len(r))) for k, r in calib.routed.items()]
    width = max((len(r) for r in rows), default=0)
    return np.array([np.pad(r, (0, width - len(r))) for r in rows]) if rows else np.zeros((0, 0))
