"""A compressed MoE in memory: fewer experts per layer, group routing, low-rank + sparse experts.

``expertkit moe compress`` writes a model folder whose ``config.json`` is the source's (a stock
model type, so descriptors, fingerprints and the weights engine read it as usual) plus the key
:data:`LAYOUT_KEY`, which says per MoE layer how many experts it holds and how tokens reach them:

* ``"routing": "group"``: the router keeps its ``E`` rows (``(E, H)`` on disk under the stock name)
  and ``group_map[e]`` is the merged expert that original expert ``e``'s tokens go to;
* ``"routing": "prune"``: the router holds one row per kept expert (stock routing);
* ``"factored": true``: every expert matrix is stored as ``lowrank_a (r, n)``, ``lowrank_b (m, r)``,
  ``sparse_values (m, k)``, ``sparse_index (k,)`` (``W ~= b a + S``) instead of ``weight``.

The layer's expert count may differ from layer to layer; the config's own expert count is the
largest. A stock transformers class cannot express group routing or per-layer counts, and refuses
such a folder (its router or expert tensors do not have the config's sizes), so
:func:`load_compressed` (called by :func:`expertkit.models.load_model` when the key is present)
builds the stock model and then gives every MoE layer its real size: the router module keeps its
class (a subclass adds the group mapping) and the experts module keeps its class with ``G`` experts
(or becomes :class:`FactoredExperts`). Memory holds the fewer experts for real.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from expertkit.errors import CheckpointError

LAYOUT_KEY = "expertkit_compressed_moe"
FORMAT = "expertkit-compressed-moe-v1"
PARTS = ("gate", "up", "down")
FACTORS = ("lowrank_a", "lowrank_b", "sparse_values", "sparse_index")


class FactoredLinear(nn.Module):
    """``x -> x (b a + S)^T`` with ``S`` nonzero only in the input columns ``index``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.lowrank_a = nn.Parameter(a)  # (r, n)
        self.lowrank_b = nn.Parameter(b)  # (m, r)
        self.sparse_values = nn.Parameter(values)  # (m, k)
        self.register_buffer("sparse_index", index.long())  # (k,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, n) -> (N, m)``."""
        out = (x @ self.lowrank_a.T) @ self.lowrank_b.T
        if self.sparse_index.numel():
            out = out + x[:, self.sparse_index] @ self.sparse_values.T
        return out


class FactoredExperts(nn.Module):
    """SwiGLU experts whose matrices are :class:`FactoredLinear`; called like transformers' experts modules."""

    def __init__(self, experts: list[dict[str, FactoredLinear]], act_fn: Any) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.ModuleDict(e) for e in experts)
        self.num_experts = len(experts)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """``hidden (N, H)``, ``top_k_index (N, k)``, ``top_k_weights (N, k)`` -> ``(N, H)``."""
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            token, slot = torch.where(top_k_index == e)  # (n,), (n,)
            x = hidden_states[token]  # (n, H)
            ex = self.experts[e]
            y = ex["down"](self.act_fn(ex["gate"](x)) * ex["up"](x))  # (n, H)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


_GROUPED: dict[type, type] = {}


def _grouped_class(cls: type) -> type:
    """``cls`` (a stock router) with its chosen experts mapped to groups (one subclass per class)."""
    if cls in _GROUPED.values():
        return cls
    if cls not in _GROUPED:
        def forward(self: Any, hidden_states: torch.Tensor) -> Any:
            out = list(cls.forward(self, hidden_states))
            members = self.group_members  # (G, E) bool
            logits = out[self.logits_at].float()  # (N, E)
            # softmax over these group logits = summed member probabilities, exactly
            out[self.logits_at] = torch.logsumexp(logits[:, None, :].masked_fill(~members, float("-inf")), dim=-1)
            out[self.selected_at] = self.group_map[out[self.selected_at]]  # (N, k) original -> group ids
            return tuple(out)

        _GROUPED[cls] = type(f"Grouped{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _GROUPED[cls]


def set_router(router: nn.Module, tensors: dict[str, torch.Tensor], group_map: list[int] | None,
               routing: Any) -> None:
    """Give ``router`` the rows (and row-indexed buffers) in ``tensors``; with ``group_map``, group routing."""
    for attr, t in tensors.items():
        if isinstance(getattr(router, attr, None), nn.Parameter):
            setattr(router, attr, nn.Parameter(t))
        else:
            setattr(router, attr, t)
    rows = int(tensors["weight"].shape[0])
    if hasattr(router, "num_experts"):
        router.num_experts = rows
    if group_map is None:
        return
    gmap = torch.tensor(group_map, dtype=torch.long)  # (E,)
    router.register_buffer("group_map", gmap, persistent=False)
    members = torch.zeros(int(gmap.max()) + 1, rows, dtype=torch.bool)  # (G, E)
    members[gmap, torch.arange(rows)] = True
    router.register_buffer("group_members", members, persistent=False)
    router.logits_at, router.selected_at = routing.logits, routing.selected
    router.__class__ = _grouped_class(type(router))


def set_experts(model: nn.Module, experts: nn.Module, parts: dict[str, Any]) -> None:
    """Replace the experts of ``experts`` by ``parts``: ``{"gate"|"up"|"down": (G, ...) tensor}`` for dense
    experts, or ``{"factored": [{"gate": Factors-like, ...} per expert]}``."""
    if "factored" in parts:
        mods = [{p: FactoredLinear(*(getattr(f, k) for k in ("a", "b", "values", "index"))) for p, f in e.items()}
                for e in parts["factored"]]
        name = next(n for n, m in model.named_modules() if m is experts)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, FactoredExperts(mods, experts.act_fn))
        return
    _check_layout(experts)
    experts.gate_up_proj = nn.Parameter(torch.cat([parts["gate"], parts["up"]], dim=1))  # (G, 2I, H)
    experts.down_proj = nn.Parameter(parts["down"])  # (G, H, I)
    experts.num_experts = int(parts["gate"].shape[0])


def _check_layout(experts: nn.Module) -> None:
    """Refuse an experts module that is not transformers' fused, concatenated SwiGLU layout."""
    ok = (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")
          and not getattr(experts, "is_transposed", False) and getattr(experts, "is_concatenated", True)
          and not getattr(experts, "has_bias", False) and getattr(experts, "has_gate", True))
    if not ok:
        raise CheckpointError(f"{type(experts).__name__}: only fused SwiGLU experts (gate_up_proj (E, 2I, H), "
                              "down_proj (E, H, I), no bias) can be compressed.")


def experts_modules(model: nn.Module) -> dict[Any, tuple[nn.Module, nn.Module]]:
    """``{(stack, layer): (router, experts)}`` of a loaded MoE (from its descriptor's routing section)."""
    from expertkit.moe.routing import routing_of

    _desc, routing = routing_of(model)
    return {k: (r, e) for k, (r, e, _n) in routing.modules(model).items()}


def expert_parameters(model: nn.Module) -> int:
    """Parameters held by the routed experts of every MoE layer of ``model`` (in memory)."""
    return sum(p.numel() for _r, e in experts_modules(model).values() for p in e.parameters())


def _read_layer(ckpt: Any, templates: dict[str, Any], layer: int, spec: dict[str, Any]) -> tuple[dict, dict]:
    """``(router tensors by attribute, experts parts)`` of one layer from the checkpoint."""
    router = {}
    for tmpl in templates["router"]:
        name = tmpl.format(layer=layer)
        router[name.rsplit(".", 1)[1]] = ckpt.read(name)
    n = int(spec["experts"])
    if spec.get("factored"):
        from expertkit.moe.compress.lowrank import Factors

        fact = [{p: Factors(*(ckpt.read(templates[p].format(layer=layer, expert=e, suffix=s)) for s in FACTORS))
                 for p in PARTS} for e in range(n)]
        return router, {"factored": fact}
    parts = {p: torch.stack([ckpt.read(templates[p].format(layer=layer, expert=e, suffix="weight"))
                             for e in range(n)]) for p in PARTS}
    return router, parts


def load_compressed(folder: Any, config: Any, *, dtype: torch.dtype = torch.float32) -> Any:
    """Load a folder written by ``expertkit moe compress`` with every MoE layer at its real size."""
    from transformers import AutoModelForCausalLM

    from expertkit.moe.routing import routing_of
    from expertkit.weights.arch import descriptor_for
    from expertkit.weights.reader import Checkpoint

    layout = getattr(config, LAYOUT_KEY, None) or {}
    if layout.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: config key {LAYOUT_KEY} is not {FORMAT}; written by another expertkit?")
    desc = descriptor_for(config)
    counts = [k for k in desc.counts.experts if isinstance(getattr(config, k, None), int)] if desc else []
    small = copy.deepcopy(config)
    for key in counts:  # build with one expert per layer; every MoE layer is replaced below
        setattr(small, key, 1)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the MoE tensors' size mismatches are expected: they are replaced below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, config=small, dtype=dtype,
                                                           ignore_mismatched_sizes=True, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    for key in counts:
        setattr(model.config, key, getattr(config, key))
    _desc, routing = routing_of(model)
    modules = routing.modules(model)
    layers = {int(k): v for k, v in layout["layers"].items()}
    moe_names = {n for k in layers for n in _module_names(model, modules[(None, k)])}
    stray = [k for k in (*info.get("missing_keys", ()), *(m[0] for m in info.get("mismatched_keys", ())))
             if not any(k.startswith(p + ".") for p in moe_names)]
    if stray or set(modules) != {(None, k) for k in layers}:
        raise CheckpointError(f"{folder}: tensors {sorted(stray)[:3]} are missing or have the wrong size, or the "
                              f"MoE layers differ from the layout; the compressed model is incomplete.")
    with Checkpoint(folder) as ckpt, torch.no_grad():
        for k, spec in layers.items():
            router, experts = modules[(None, k)][:2]
            r_tensors, parts = _read_layer(ckpt, layout["templates"], k, spec)
            r_tensors = {a: t.to(dtype) if t.is_floating_point() else t for a, t in r_tensors.items()}
            parts = parts if "factored" in parts else {p: t.to(dtype) for p, t in parts.items()}
            set_router(router, r_tensors, spec.get("group_map"), routing)
            set_experts(model, experts, parts)
    return model.eval()


def _module_names(model: nn.Module, mods: tuple[Any, ...]) -> list[str]:
    wanted = {id(m) for m in mods[:2]}
    return [n for n, m in model.named_modules() if id(m) in wanted]
