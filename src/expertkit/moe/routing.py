"""Hooks on the routers of a loaded MoE, found from its architecture descriptor (data, not class names).

:class:`RoutingTap` registers one forward hook per router module named by the descriptor's
``routing`` section (:class:`~expertkit.weights.arch_spec.Routing`). On every forward pass each
hook reads the router's own output, so the experts it reports are exactly the ones the model
used (capacity drops included for Switch-style dispatch masks), and hands a
:class:`RouterEvent` to a sink: the router input, the logits and a ``(tokens, E)`` 0/1 matrix of
the chosen experts, all flattened over batch and sequence, plus the mask of real (non-padding)
tokens.

:func:`expert_outputs` evaluates every expert of one layer alone on chosen tokens through the
experts module's own forward (the descriptor says how it is called), which is how output
similarity between experts is measured on the same tokens without any extra forward pass.

:func:`forward_batches` is the one loop every router consumer runs (routing statistics, REAP
scores, quantization calibration): the model in eval mode, one forward pass per ``(ids, mask)``
batch, the mask handed to every watcher (a tap, an observer) before each pass, training mode put
back afterwards.

A compressed MoE (``expertkit moe compress``) may keep a different number of experts in each
layer; :attr:`RoutingTap.layer_experts` holds each layer's count, and every event's ``logits`` and
``chosen`` have that many columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertkit.errors import ConfigError, ExpertkitError
from expertkit.weights.arch import descriptor_for, list_architectures


class NotAnMoeError(ExpertkitError, ValueError):
    """The model is dense, or its architecture has no routing description."""


LayerKey = tuple[str | None, int]  # (stack, layer); stack is None for decoder-only models


@dataclass
class RouterEvent:
    """What one router did on one forward pass (tokens flattened over batch and sequence)."""

    key: LayerKey
    hidden: torch.Tensor  # (N, H) router input
    logits: torch.Tensor  # (N, E)
    chosen: torch.Tensor  # (N, E) 0/1: the experts each token was sent to
    mask: torch.Tensor  # (N,) bool: real tokens


def layer_name(key: LayerKey) -> str:
    """``"12"`` for decoder-only layers, ``"encoder.3"`` for a stack's layer."""
    return str(key[1]) if key[0] is None else f"{key[0]}.{key[1]}"


def routing_of(model: Any):
    """``(descriptor, routing)`` of a loaded model; :class:`NotAnMoeError` for dense or undescribed ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    desc = descriptor_for(config) if config is not None else None
    if desc is None:
        raise NotAnMoeError(
            f"no architecture descriptor for model_type {model_type!r}, so its routers cannot be found. "
            "Add weights/arch/<name>.yaml with a 'routing' section (router and experts module templates); "
            f"known architectures: {', '.join(list_architectures())}.")
    if desc.routing is None:
        raise NotAnMoeError(
            f"model_type {model_type!r} ({desc.name}) is a dense architecture: it has no routers. "
            "Routing statistics need a mixture-of-experts model (e.g. one made by `expertkit moe build`).")
    return desc, desc.routing


class RoutingTap:
    """Context manager: while active, ``sink(event)`` is called for every router call of ``model``.

    Set :attr:`mask` to the ``(batch, seq)`` attention mask before each forward pass so that padding
    tokens are marked; a router that sees a different number of tokens (e.g. a decoder stack)
    treats all of its tokens as real. ``sink`` may be set after construction (a sink that needs the
    tap's layers); :attr:`num_experts` is the config's (largest) count, :attr:`layer_experts` each
    layer's own.
    """

    def __init__(self, model: Any, sink: Callable[[RouterEvent], None] | None = None) -> None:
        self.model = model
        self.descriptor, self.routing = routing_of(model)
        self.layers = self.routing.modules(model)  # {(stack, layer): (router, experts, name)}
        if not self.layers:
            raise NotAnMoeError(
                f"{self.descriptor.name}: no module matches the router template "
                f"{self.routing.router.pattern!r}; is this model's MoE layout the one the descriptor describes?")
        config = model.config.to_dict()
        self.num_experts = int(self.descriptor.num_experts(config) or 0)
        if self.num_experts < 1:
            raise ConfigError(f"{self.descriptor.name}: the config gives no expert count "
                              f"(looked for {', '.join(self.descriptor.counts.experts)}).")
        self.top_k = int(self.descriptor.top_k(config) or 1)
        self.layer_experts = layer_expert_counts(model, list(self.layers), self.num_experts)
        self.sink = sink
        self.mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> RoutingTap:
        if self.sink is None:
            raise ConfigError("RoutingTap: set a sink before attaching the tap.")
        for key, (router, _experts, _name) in self.layers.items():
            self._handles.append(router.register_forward_hook(self._hook(key)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, key: LayerKey) -> Callable[..., None]:
        r, n_exp = self.routing, self.layer_experts[key]

        def hook(_module: Any, inputs: tuple[Any, ...], output: Any) -> None:
            hidden = inputs[0].detach()
            hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
            raw = output[r.logits].detach()
            if raw.shape[-1] != n_exp:
                raise ConfigError(f"router of layer {layer_name(key)} gives {raw.shape[-1]} logits per token, but "
                                  f"the layer holds {n_exp} experts; the model's config or compression layout "
                                  "does not describe this model.")
            logits = raw.reshape(-1, n_exp).float()  # (N, E)
            chosen = _chosen(output[r.selected].detach(), r.selected_format, n_exp)  # (N, E)
            if logits.shape[0] != hidden.shape[0] or chosen.shape[0] != hidden.shape[0]:
                raise ConfigError(f"router of layer {layer_name(key)}: {hidden.shape[0]} tokens in, "
                                  f"{logits.shape[0]} logit rows out; the descriptor's routing positions "
                                  "do not fit this model.")
            mask = self.mask
            if mask is not None and mask.numel() == hidden.shape[0]:
                real = mask.reshape(-1).bool()
            else:
                real = torch.ones(hidden.shape[0], dtype=torch.bool)
            self.sink(RouterEvent(key, hidden, logits, chosen, real))

        return hook


def layer_expert_counts(model: Any, keys: Sequence[LayerKey], default: int) -> dict[LayerKey, int]:
    """``{(stack, layer): experts}``: ``default`` (the config's count) for every layer, except the layers
    a compressed MoE's layout (:data:`~expertkit.moe.compressed.LAYOUT_KEY`) gives a count of their own."""
    from expertkit.moe.compressed import LAYOUT_KEY

    layout = getattr(model.config, LAYOUT_KEY, None) or {}
    own = {str(k): int(v["experts"]) for k, v in (layout.get("layers") or {}).items()}
    return {key: own.get(str(key[1]), default) if key[0] is None else default for key in keys}


class _EndOfPass(Exception):
    """Raised by :func:`forward_batches`' ``stop_at`` hook: the rest of the forward pass is not needed."""


def _end_pass(_module: Any, _inputs: Any, _output: Any) -> None:
    raise _EndOfPass


@torch.no_grad()
def forward_batches(model: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], description: str, *,
                    watchers: Sequence[Any] = (), before: Callable[[int], None] | None = None,
                    stop_at: torch.nn.Module | None = None) -> None:
    """One eval-mode forward pass of ``model`` per ``(ids (B, T), mask (B, T))`` batch, with a progress bar.

    Before each pass every watcher's ``mask`` attribute is set to the batch's mask (a
    :class:`RoutingTap`, an observer) and ``before(i)`` is called with the batch's position. An
    encoder-decoder model gets one decoder start token per row (its encoder routers see the prompt).
    ``stop_at``: a submodule after whose forward the pass ends (what comes after it, e.g. the later
    layers and the vocabulary head, is not computed; hooks on those never fire). The model's training
    mode is put back afterwards, also on failure; attaching and removing hooks is the caller's (``with tap:``).
    """
    from expertkit.progress import track

    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    start = getattr(model.config, "decoder_start_token_id", 0) or 0
    was_training = model.training
    model.eval()
    stop = stop_at.register_forward_hook(_end_pass) if stop_at is not None else None
    try:
        for i, (ids, mask) in enumerate(track(list(batches), description)):
            for watcher in watchers:
                watcher.mask = mask
            if before is not None:
                before(i)
            extra = {"decoder_input_ids": torch.full((ids.shape[0], 1), start)} if seq2seq else {}
            try:
                model(input_ids=ids, attention_mask=mask, **extra)
            except _EndOfPass:
                pass
    finally:
        if stop is not None:
            stop.remove()
        model.train(was_training)


def _chosen(selected: torch.Tensor, fmt: str, num_experts: int) -> torch.Tensor:
    """``(N, E)`` 0/1 float matrix of chosen experts from indices ``(N, k)`` or a one-hot mask ``(..., E)``."""
    if fmt == "one_hot":
        return selected.reshape(-1, num_experts).float()
    idx = selected.reshape(selected.shape[0], -1).long()  # (N, k)
    out = torch.zeros(idx.shape[0], num_experts)
    out.scatter_(1, idx, 1.0)
    return out


@torch.no_grad()
def expert_outputs(experts: Any, hidden: torch.Tensor, num_experts: int, call: str) -> torch.Tensor:
    """``(E, N, H)``: each expert of one layer applied alone, at weight 1, to ``hidden`` ``(N, H)``.

    One call of the experts module: the tokens are repeated once per expert, copy ``e`` sent to
    expert ``e`` alone (an expert's output for a token does not depend on the other tokens)."""
    n = hidden.shape[0]
    rep = hidden.repeat(num_experts, 1)  # (E * N, H): copy e is rows e*N .. (e+1)*N-1
    which = torch.arange(num_experts).repeat_interleave(n)  # (E * N,)
    weight = torch.ones(num_experts * n, 1, dtype=hidden.dtype)
    if call == "dispatch":
        route = torch.nn.functional.one_hot(which, num_experts).unsqueeze(1)  # (E * N, 1, E)
    else:
        route = which.unsqueeze(1)  # (E * N, 1)
    out = experts(rep, route, weight)
    return out.reshape(num_experts, n, -1).float()  # (E, N, H)
