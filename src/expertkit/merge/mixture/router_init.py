"""Routers initialised from hidden states of per-task prompts, and brief router training.

**Initialisation** (:func:`hidden_state_routers`). A *probe* model (a dense model sharing the
mixture's trunk, e.g. the uniform merge of the experts) reads each expert's prompts; at every
layer the input of the MLP (the output of ``post_attention_layernorm``) is averaged over the
prompts' real tokens, giving ``m[L, e]`` (hidden,). Router row ``e`` of layer ``L`` is the
centred, unit-norm direction ``(m[L, e] - mean_e m[L, e]) / ||.||`` times ``scale``: a token is
sent to the expert whose prompts' mean it is closest to along the directions that separate the
experts (nearest centroid without a bias term). mergekit's MoE "hidden" gate mode also uses mean
hidden states of prompts; it does not centre them.

**Training** (:func:`train_routers`, optional). Only the router weights of a loaded Mixtral are
trained, with cross-entropy between each layer's router logits at every real prompt token and
the index of the expert the prompt belongs to (top-1 routing gives the language-model loss no
gradient to the router, so the routing target is supervised directly). AdamW, seeded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from expertkit.errors import ConfigError

_NORM = re.compile(r"(?:.*\.)?layers\.(\d+)\.post_attention_layernorm$")
_GATE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate$")


def _encode(tokenizer: Any, prompts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    from expertkit.tasks.infer import encode_prompts, pad, pad_id_of

    ids = encode_prompts(tokenizer, list(prompts), max_tokens)
    return pad(ids, pad_id_of(tokenizer), side="right")  # (B, T), (B, T)


def _hooked(model: Any, pattern: re.Pattern[str]) -> dict[int, torch.nn.Module]:
    mods = {int(m.group(1)): mod for name, mod in model.named_modules() if (m := pattern.match(name))}
    if not mods:
        raise ConfigError(f"the model has no modules matching {pattern.pattern}; is it a Llama/Mixtral model?")
    return dict(sorted(mods.items()))


@torch.no_grad()
def mlp_input_means(model: Any, tokenizer: Any, prompts: Sequence[Sequence[str]], *,
                    batch_size: int = 8, max_tokens: int = 256) -> torch.Tensor:
    """``(layers, experts, hidden)`` mean MLP inputs of each expert's prompts (real tokens only)."""
    norms = _hooked(model, _NORM)
    caught: dict[int, torch.Tensor] = {}
    handles = [mod.register_forward_hook(lambda _m, _i, out, k=k: caught.__setitem__(k, out))
               for k, mod in norms.items()]
    means = []
    was_training = model.training
    model.eval()
    try:
        for group in prompts:
            if not group:
                raise ConfigError("every expert needs at least one prompt to initialise its router.")
            total, count = None, 0.0
            for start in range(0, len(group), batch_size):
                ids, mask = _encode(tokenizer, group[start:start + batch_size], max_tokens)
                model(input_ids=ids, attention_mask=mask)
                m = mask.unsqueeze(-1).float()  # (B, T, 1)
                s = torch.stack([(caught[k].float() * m).sum((0, 1)) for k in norms])  # (L, H)
                total = s if total is None else total + s
                count += float(mask.sum())
            means.append(total / count)  # (L, H)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.stack(means, dim=1)  # (L, E, H)


def routers_from_means(means: torch.Tensor, scale: float = 1.0) -> dict[int, torch.Tensor]:
    """Router weights ``{layer: (E, H)}``: centred, unit-norm mean directions times ``scale``."""
    centred = means - means.mean(dim=1, keepdim=True)  # (L, E, H)
    unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return {layer: unit[layer] * scale for layer in range(means.shape[0])}


def hidden_state_routers(probe: Any, tokenizer: Any, prompts: Sequence[Sequence[str]], *,
                         scale: float = 1.0, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Routers of every layer from the probe model's hidden states (see the module docstring)."""
    return routers_from_means(mlp_input_means(probe, tokenizer, prompts, batch_size=batch_size), scale)


def train_routers(model: Any, tokenizer: Any, prompts: Sequence[Sequence[str]], *, steps: int = 20,
                  lr: float = 1e-2, batch_size: int = 8, seed: int = 0, max_tokens: int = 256) -> list[float]:
    """Train only the routers of a Mixtral model to send each expert's prompts to it; returns losses."""
    gates = _hooked(model, _GATE)
    params = [g.weight for g in gates.values()]
    rows = [(p, e) for e, group in enumerate(prompts) for p in group]
    if not rows:
        raise ConfigError("router training needs prompts.")
    logits: dict[int, torch.Tensor] = {}
    handles = [g.register_forward_hook(lambda _m, _i, out, k=k: logits.__setitem__(k, out[0]))
               for k, g in gates.items()]
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    was_training = model.training
    model.eval()  # no dropout / jitter: only the router weights change
    try:
        for _ in range(steps):
            pick = torch.randint(len(rows), (min(batch_size, len(rows)),), generator=gen).tolist()
            ids, mask = _encode(tokenizer, [rows[i][0] for i in pick], max_tokens)
            target = torch.tensor([rows[i][1] for i in pick]).unsqueeze(1).expand_as(ids)  # (B, T)
            model(input_ids=ids, attention_mask=mask)
            flat_t = target.reshape(-1)[mask.reshape(-1).bool()]  # (tokens,)
            loss = torch.stack([
                F.cross_entropy(logits[k].float()[mask.reshape(-1).bool()], flat_t) for k in gates
            ]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
    return losses
