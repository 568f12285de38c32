"""Mix: train the routers of the assembled MoE on the mixture of all clusters, with load balancing.

The loss is the language-modelling loss on the mixture's batches plus ``aux_loss_coef`` times the
load-balancing loss as Switch Transformers and Mixtral define it, ``E * sum_e f_e * P_e`` (``f_e``
the share of routing decisions that went to expert ``e``, ``P_e`` the mean router probability of
``e``), computed by transformers' own MoE classes (``output_router_logits=True``, padding masked).
With top-k > 1 the language-modelling loss reaches the routers through the renormalised weights of
the chosen experts; the auxiliary loss keeps the experts in use.

``train="router"`` updates the router weights only (and, for a Qwen2-MoE with a shared expert, the
shared expert's gate); ``"router+experts"`` also updates every expert (memory: AdamW keeps two
copies of all expert weights). Progress is saved every ``save_every`` steps; an interrupted run
resumes from there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from expertkit.errors import ConfigError
from expertkit.moe.config import MoeBuildConfig
from expertkit.moe.data import ClusterData, mixture_batch
from expertkit.train.data import IGNORE, collate
from expertkit.train.state import load_checkpoint, save_checkpoint


def trainable_names(model: Any, mode: str) -> list[str]:
    """Parameter names trained in ``mode``: router weights (+ shared-expert gates), + experts for router+experts."""
    from expertkit.moe.routing import routing_of

    _, routing = routing_of(model)
    names = []
    for name, _ in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if routing.router.fullmatch(module) or name.endswith("shared_expert_gate.weight"):
            names.append(name)
        elif mode == "router+experts" and routing.experts.fullmatch(module):
            names.append(name)
    if not names:
        raise ConfigError("found no router parameters to train; is this an MoE with a routing description?")
    return names


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens (``labels`` -100 elsewhere), next-token shifted."""
    shift_logits = logits[:, :-1].float()  # (B, L-1, V)
    shift_labels = labels[:, 1:]  # (B, L-1)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE)


def train_routers(model: Any, tokenizer: Any, clusters: list[ClusterData], config: MoeBuildConfig,
                  ckpt: Path, ident: str) -> dict[str, Any]:
    """Train ``model``'s routers in place (see the module docstring); returns the loss record."""
    from expertkit.progress import loss_bar
    from expertkit.tasks.infer import pad_id_of

    spec = config.router
    names = trainable_names(model, spec.train)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    chosen = [params[n] for n in names]
    for p in chosen:
        p.requires_grad_(True)
    is_router = [not (spec.train == "router+experts" and ".experts." in n) for n in names]
    groups = [{"params": [p for p, r in zip(chosen, is_router, strict=True) if r], "lr": spec.lr}]
    if not all(is_router):
        groups.append({"params": [p for p, r in zip(chosen, is_router, strict=True) if not r], "lr": spec.expert_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    start, lm_losses, aux_losses, prior = 0, [], [], 0.0
    if ckpt.is_file():
        trainable, opt_state, _rng, record = load_checkpoint(ckpt)
        if record.get("identity") == ident and sorted(trainable) == sorted(names):
            with torch.no_grad():
                for n in names:
                    params[n].copy_(trainable[n])
            opt.load_state_dict(opt_state)
            start, prior = record["step"], record["seconds"]
            lm_losses, aux_losses = list(record["lm_losses"]), list(record["aux_losses"])
    pad = pad_id_of(tokenizer)
    model.train()
    began = time.perf_counter()
    try:
        with loss_bar("Router training", spec.steps, start) as advance:
            for step in range(start, spec.steps):
                rows = mixture_batch(clusters, step, spec.batch_size, config.general_fraction, config.seed)
                ids, mask, labels = collate(rows, pad)
                out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
                lm = lm_loss(out.logits, labels)
                aux = out.aux_loss if getattr(out, "aux_loss", None) is not None else torch.zeros(())
                loss = lm + spec.aux_loss_coef * aux
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                lm_losses.append(float(lm.detach()))
                aux_losses.append(float(aux.detach()))
                advance(float(loss.detach()))
                done = step + 1
                if config.save_every and done % config.save_every == 0 and done < spec.steps:
                    save_checkpoint(ckpt, trainable={n: params[n] for n in names}, optimizer_state=opt.state_dict(),
                                    rng_state=torch.get_rng_state(),
                                    record={"identity": ident, "step": done, "lm_losses": lm_losses,
                                            "aux_losses": aux_losses, "seconds": prior + time.perf_counter() - began})
    finally:
        model.eval()
        for p in params.values():
            p.requires_grad_(False)
    return {"steps": spec.steps, "trained": spec.train, "parameters": sum(params[n].numel() for n in names),
            "lm_losses": lm_losses, "aux_losses": aux_losses, "seconds": prior + time.perf_counter() - began}
