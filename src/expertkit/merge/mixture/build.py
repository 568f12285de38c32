"""Build an FFN-level mixture end to end: probe, router initialisation, conversion, training.

:func:`build_ffn_mixture` takes dense model folders (the cluster representatives) and, per
expert, the prompts of the tasks it serves:

1. the *probe* is the uniform average of the dense models (the trunk the mixture shares, with the
   mean MLP), loaded once;
2. routers come from the probe's MLP-input hidden states on each expert's prompts
   (:func:`~expertkit.merge.mixture.router_init.hidden_state_routers`);
3. the MoE folder (Mixtral, or Qwen2-MoE for dense Qwen2) is written
   (:func:`~expertkit.merge.mixture.ffn.dense_to_moe`);
4. with ``train_steps > 0`` the routers are trained briefly
   (:func:`~expertkit.merge.mixture.router_init.train_routers`) and the folder is rewritten with
   the trained routers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from expertkit.merge.mixture.ffn import dense_to_moe
from expertkit.merge.mixture.router_init import hidden_state_routers, train_routers


def uniform_probe(experts: Sequence[str | os.PathLike[str]]) -> Any:
    """The first dense model loaded, with every tensor replaced by the mean over ``experts``."""
    from expertkit.models import load_model
    from expertkit.weights import Checkpoint

    loaded = load_model(experts[0])
    ckpts = [Checkpoint(p) for p in experts]
    try:
        state = loaded.model.state_dict()
        with torch.no_grad():
            for name, t in state.items():
                if name not in ckpts[0] or not t.dtype.is_floating_point:
                    continue  # tied weights (lm_head) share the embedding already
                mean = torch.stack([c.read(name).to(torch.float32) for c in ckpts]).mean(0)
                t.copy_(mean.to(t.dtype))
    finally:
        for c in ckpts:
            c.close()
    return loaded


def build_ffn_mixture(
    experts: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    prompts: Sequence[Sequence[str]],
    *,
    top_k: int = 1,
    train_steps: int = 0,
    lr: float = 1e-2,
    seed: int = 0,
    scale: float = 1.0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the MoE mixture of ``experts`` (Mixtral or Qwen2-MoE) with routers from ``prompts``; returns a summary."""
    probe = uniform_probe(experts)
    routers = hidden_state_routers(probe.model, probe.tokenizer, prompts, scale=scale)
    tokenizer = probe.tokenizer
    del probe
    out = dense_to_moe(experts, out_dir, routers=routers, top_k=top_k, overwrite=overwrite)
    losses: list[float] = []
    if train_steps:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        losses = train_routers(model, tokenizer, prompts, steps=train_steps, lr=lr, seed=seed)
        gates = {int(n.split(".layers.")[1].split(".")[0]): p.detach().clone()
                 for n, p in model.named_parameters() if n.endswith(".mlp.gate.weight")}
        del model
        out = dense_to_moe(experts, out_dir, routers=gates, top_k=top_k, overwrite=True)
    return {"path": str(Path(out)), "experts": [str(e) for e in experts], "top_k": top_k,
            "router_train_losses": losses}
