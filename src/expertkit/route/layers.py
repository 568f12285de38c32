"""Per-token routing over stacked LoRA experts inside a model's linear layers.

:func:`attach` replaces each adapted ``nn.Linear`` of a model by a :class:`RoutedLinear` that adds
``sum_e w[b, t, e] * B_e A_e x`` to the frozen layer's output, with the weights ``w`` from one shared
:class:`RouteState`. The state's ``mode`` says where the weights come from:

* ``local`` (Phatgoose): per token and per module, logits = correlation of the standardised token
  input with each expert's standardised gate vector, ``(x_s . g_s) / d``, in [-1, 1];
* ``glider``: the local logits plus ``alpha`` times the query's global scores (one row per query);
* ``global``: the query's scores alone, the same at every token and module (retrieval, oracle);
* ``fixed``: one weight per expert (per query row or shared): ``sum_e w_e B_e A_e`` (uniform merge);
* ``lorahub``: LoraHub's composition ``(sum_e w_e B_e)(sum_e w_e A_e)`` with one weight per expert.

For the score modes the top ``top_k`` experts of each token are kept and their scores turned into
weights by a softmax at ``temperature``. Global scores are per batch row; :func:`query_hook` sets
them at each prefill from a table keyed by the row's prompt tokens, so routing works inside batched
``generate`` (left padding) and in right-padded scoring alike, and decode steps keep the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from expertkit.errors import ConfigError
from expertkit.route.library import LoraStack

MODES = ("local", "glider", "global", "fixed", "lorahub")


@dataclass
class RouteState:
    """What every routed layer of one model reads: the mode, its knobs and the current rows' scores."""

    mode: str = "glider"
    top_k: int = 2
    alpha: float = 1.0
    temperature: float = 0.1
    global_scores: torch.Tensor | None = None  # (B, E) for the rows of the current batch
    weights: torch.Tensor | None = None  # (E,) for fixed / lorahub
    trace: list[tuple[str, torch.Tensor]] | None = None  # when a list: (module, top-k indices (B, T, k))
    table: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # prompt ids -> (E,) scores

    def check(self, n_experts: int) -> None:
        """Refuse settings that cannot route ``n_experts`` experts."""
        if self.mode not in MODES:
            from expertkit.errors import unknown

            raise unknown("routing mode", self.mode, MODES)
        if not 1 <= self.top_k <= n_experts and self.mode in ("local", "glider", "global"):
            raise ConfigError(f"top_k must be between 1 and the number of experts ({n_experts}); got {self.top_k}.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0; got {self.temperature}.")
        if self.mode in ("fixed", "lorahub") and (self.weights is None or self.weights.shape != (n_experts,)):
            raise ConfigError(f"mode '{self.mode}' needs one weight per expert ({n_experts}).")


def standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance over the last dimension."""
    mu = x.mean(-1, keepdim=True)
    sd = x.std(-1, keepdim=True, unbiased=False)
    return (x - mu) / (sd + eps)


def topk_weights(scores: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense weights ``(..., E)`` that are a softmax over each row's top ``k`` scores, zero elsewhere;
    and the top-k indices ``(..., k)``."""
    top_v, top_i = scores.topk(k, dim=-1)  # (..., k)
    w = torch.softmax(top_v / temperature, dim=-1)  # (..., k)
    return torch.zeros_like(scores).scatter(-1, top_i, w), top_i


class RoutedLinear(nn.Module):
    """A frozen linear layer plus a routed mixture of LoRA experts (see the module docstring)."""

    def __init__(self, base: nn.Linear, stack: LoraStack, state: RouteState, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.state = state
        e, r, d_in = stack.a.shape
        self.register_buffer("a", stack.a.to(base.weight.dtype), persistent=False)  # (E, r, in)
        # (out, E * r): B of every expert side by side, so one matmul sums the weighted experts
        b_cat = stack.b.to(base.weight.dtype).permute(1, 0, 2).reshape(stack.b.shape[1], e * r)
        self.register_buffer("b_cat", b_cat, persistent=False)
        g = None if stack.gates is None else standardise(stack.gates.to(base.weight.dtype))  # (E, in)
        self.register_buffer("gates", g, persistent=False)
        self.n_experts, self.rank, self.d_in = e, r, d_in

    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token logits ``(B, T, E)``: correlation of the standardised input with each standardised gate."""
        if self.gates is None:
            raise ConfigError(f"local routing needs gate vectors and the library has none at {self.name}; "
                              "build the library with gates (expertkit route build).")
        return standardise(x) @ self.gates.T / self.d_in  # (B, T, in) @ (in, E) -> (B, T, E)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Expert weights ``(B, T, E)`` for input ``x`` ``(B, T, in)``."""
        s = self.state
        if s.mode == "fixed":
            return s.weights.to(x.dtype).expand(*x.shape[:-1], self.n_experts)  # (B, T, E)
        if s.mode == "local":
            scores = self.local_logits(x)
        else:
            if s.global_scores is None or s.global_scores.shape != (x.shape[0], self.n_experts):
                raise ConfigError(f"mode '{s.mode}' needs global scores for the {x.shape[0]} rows of this batch; "
                                  "register the queries first (Router.prepare).")
            glob = s.global_scores.to(x.dtype)[:, None, :]  # (B, 1, E)
            scores = glob.expand(*x.shape[:-1], self.n_experts) if s.mode == "global" \
                else self.local_logits(x) + s.alpha * glob  # (B, T, E)
        w, top_i = topk_weights(scores, s.top_k, s.temperature)
        if s.trace is not None:
            s.trace.append((self.name, top_i.detach().clone()))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + sum_e w_e B_e A_e x``; ``x`` is ``(..., in)``."""
        y = self.base(x)
        x3 = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])  # (B, T, in)
        if self.state.mode == "lorahub":
            w = self.state.weights.to(x.dtype)  # (E,)
            a_m = torch.einsum("e,eri->ri", w, self.a)  # (r, in)
            b_all = self.b_cat.view(self.b_cat.shape[0], self.n_experts, self.rank)  # (out, E, r)
            b_m = torch.einsum("e,oer->or", w, b_all)  # (out, r)
            delta = (x3 @ a_m.T) @ b_m.T  # (B, T, out)
        else:
            w = self.route(x3)  # (B, T, E)
            z = torch.einsum("bti,eri->bter", x3, self.a) * w[..., None]  # (B, T, E, r)
            delta = z.reshape(*z.shape[:2], -1) @ self.b_cat.T  # (B, T, E*r) @ (E*r, out) -> (B, T, out)
        return y + delta.reshape(*y.shape)


def attach(model: nn.Module, stacks: dict[str, LoraStack], state: RouteState) -> Callable[[], None]:
    """Put a :class:`RoutedLinear` at every module of ``stacks``; returns ``detach()`` that puts the
    original layers back. A module name the model lacks, or a non-linear one, is an error."""
    n = {s.a.shape[0] for s in stacks.values()}
    if len(n) != 1:
        raise ConfigError("every module must stack the same experts.")
    state.check(n.pop())
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, stack in stacks.items():
            parent_name, _, child = name.rpartition(".")
            try:
                parent = model.get_submodule(parent_name)
                layer = getattr(parent, child)
            except AttributeError:
                raise ConfigError(f"the model has no module {name}; the library's experts were made for "
                                  "another architecture.") from None
            if not isinstance(layer, nn.Linear):
                raise ConfigError(f"{name} is a {type(layer).__name__}, not a linear layer; routing adapts linear layers.")
            if (layer.out_features, layer.in_features) != (stack.b.shape[1], stack.a.shape[2]):
                raise ConfigError(f"{name}: expert factors do not match the layer's shape "
                                  f"({layer.out_features}, {layer.in_features}).")
            setattr(parent, child, RoutedLinear(layer, stack, state, name))
            originals.append((parent, child, layer))
    except BaseException:
        for parent, child, layer in originals:
            setattr(parent, child, layer)
        raise

    def detach() -> None:
        """Give the model its original layers back."""
        for parent, child, layer in originals:
            setattr(parent, child, layer)

    return detach


def _cache_len(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError):
        return 0


def lookup_rows(table: dict[tuple[int, ...], torch.Tensor], ids: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    """Scores ``(B, E)`` for the rows of ``ids`` ``(B, L)``: each row's real tokens (``mask`` 1) must
    start with a registered prompt; the longest registered prompt that is a prefix wins."""
    lengths = sorted({len(k) for k in table}, reverse=True)
    rows = []
    for b in range(ids.shape[0]):
        real = ids[b][mask[b].bool()] if mask is not None else ids[b]
        toks = real.tolist()
        hit = next((table[tuple(toks[:n])] for n in lengths if n <= len(toks) and tuple(toks[:n]) in table), None)
        if hit is None:
            raise ConfigError("a batch row starts with no registered query; call Router.prepare(prompts) with "
                              "every prompt before running the routed model on it.")
        rows.append(hit)
    return torch.stack(rows)  # (B, E)


def query_hook(model: nn.Module, state: RouteState) -> Callable[[], None]:
    """Set ``state.global_scores`` from ``state.table`` at every prefill forward of ``model`` (no cache
    yet); decode steps keep them. Returns the hook's ``remove``."""

    def hook(module: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        if state.mode not in ("glider", "global") or _cache_len(kwargs) > 0:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ConfigError("routing by query needs input_ids (not inputs_embeds).")
        state.global_scores = lookup_rows(state.table, ids, kwargs.get("attention_mask"))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return handle.remove
