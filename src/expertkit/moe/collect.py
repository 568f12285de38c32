"""One streamed pass over calibration prompts that fills :class:`~expertkit.moe.stats.RoutingStats`.

:func:`collect_routing_stats` runs the model once per batch with a :class:`RoutingTap` attached:
no extra forward pass. Expert-output similarity needs every expert's output on the same tokens;
it is measured on ``sample_tokens`` real tokens per layer and batch (seeded draw), by calling the
layer's experts module on them directly, which costs ``E * sample_tokens`` expert evaluations per
layer and batch on top of the forward pass (``bench/moe_stats.py`` measures the total).

:func:`routing_stats` is the cached entry point: a model source and tasks in, statistics out,
cached under ``<cache>/moe-stats/`` by (a digest of the model's weights in memory, prompts, settings,
seed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from expertkit.errors import ConfigError
from expertkit.moe.routing import RouterEvent, RoutingTap, expert_outputs, forward_batches, layer_name
from expertkit.moe.stats import FORMAT, RoutingStats


class _Accumulator:
    """The sink of a :class:`RoutingTap`: adds each router event to the sums of a RoutingStats."""

    def __init__(self, tap: RoutingTap, stats: RoutingStats, sample_tokens: int, seed: int) -> None:
        self.tap, self.stats, self.sample = tap, stats, sample_tokens
        self.keys = list(tap.layers)
        self.position = {key: i for i, key in enumerate(self.keys)}
        self.task: str | None = None
        self.gen = torch.Generator().manual_seed(seed)
        # Sampled router inputs wait here per layer and go through the experts FLUSH_AT tokens at a
        # time: one experts call per layer and flush instead of one per expert and batch (measured on
        # the default MoE: the per-batch calls made the statistics pass 1.75x a plain forward pass).
        self.pending: dict[int, list[torch.Tensor]] = {}

    def __call__(self, event: RouterEvent) -> None:
        s, i = self.stats, self.position[event.key]
        chosen = event.chosen[event.mask].double()  # (n, e): e = this layer's experts (<= E when compressed)
        logits = event.logits[event.mask].double()  # (n, e)
        e = chosen.shape[1]
        s.counts[i, :e] += chosen.sum(0).numpy()
        s.coactivation[i, :e, :e] += (chosen.T @ chosen).numpy()
        s.logit_gram[i, :e, :e] += (logits.T @ logits).numpy()
        s.logit_sum[i, :e] += logits.sum(0).numpy()
        s.tokens[i] += chosen.shape[0]
        if self.task is not None:
            s.task_counts[self.task][i, :e] += chosen.sum(0).numpy()
        if self.sample and chosen.shape[0]:
            real = event.mask.nonzero().squeeze(1)  # (n,)
            pick = real[torch.randperm(real.numel(), generator=self.gen)[: self.sample]]
            self.pending.setdefault(i, []).append(event.hidden[pick].clone())  # (s, H)
            if sum(h.shape[0] for h in self.pending[i]) >= self.FLUSH_AT:
                self.flush(i)

    FLUSH_AT = 256

    def flush(self, i: int | None = None) -> None:
        """Run the waiting sampled tokens of layer ``i`` (all layers when ``None``) through its experts."""
        for j in [i] if i is not None else list(self.pending):
            waiting = self.pending.pop(j, [])
            if not waiting:
                continue
            s, key = self.stats, self.keys[j]
            hidden = torch.cat(waiting)  # (S, H)
            e = self.tap.layer_experts[key]
            outs = expert_outputs(self.tap.layers[key][1], hidden, e, self.tap.routing.expert_call)  # (e, S, H)
            unit = outs / outs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            s.output_cos[j, :e, :e] += torch.einsum("esh,fsh->ef", unit, unit).double().numpy()
            s.output_mean[j, :e] += outs.sum(1).double().numpy()
            s.output_tokens[j] += hidden.shape[0]


def _batches(tokenizer: Any, prompts: Sequence[str], batch_size: int, max_tokens: int):
    from expertkit.tasks.infer import encode_prompts, pad, pad_id_of

    pad_id = pad_id_of(tokenizer)
    for start in range(0, len(prompts), batch_size):
        ids = encode_prompts(tokenizer, list(prompts[start:start + batch_size]), max_tokens)
        yield pad(ids, pad_id, side="right")  # (B, T), (B, T)


@torch.no_grad()
def collect_routing_stats(
    model: Any,
    tokenizer: Any,
    prompts: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 8,
    max_tokens: int = 256,
    sample_tokens: int = 16,
    seed: int = 0,
) -> RoutingStats:
    """Routing statistics of ``model`` over ``prompts`` (``{task name: [prompt, ...]}``), one pass.

    Raises :class:`~expertkit.moe.routing.NotAnMoeError` for a dense model or an architecture
    without a routing description.
    """
    if not any(prompts.values()):
        raise ConfigError("routing statistics need at least one prompt.")
    tap = RoutingTap(model)
    hidden = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "d_model", 0))
    stats = RoutingStats.empty([layer_name(k) for k in tap.layers], tap.num_experts, tap.top_k, hidden,
                               sample_tokens > 0, [tap.layer_experts[k] for k in tap.layers])
    stats.task_counts = {t: np.zeros((len(tap.layers), tap.num_experts)) for t in prompts if prompts[t]}
    stats.task_tokens = dict.fromkeys(stats.task_counts, 0)
    acc = tap.sink = _Accumulator(tap, stats, sample_tokens, seed)
    work = [(task, batch) for task, group in prompts.items() if group
            for batch in _batches(tokenizer, group, batch_size, max_tokens)]

    def before(i: int) -> None:
        acc.task = work[i][0]
        stats.task_tokens[acc.task] += int(work[i][1][1].sum())

    with tap:
        forward_batches(model, [batch for _task, batch in work], "Routing statistics", watchers=[tap], before=before)
        acc.flush()
    stats.meta.update({"batch_size": batch_size, "max_tokens": max_tokens, "sample_tokens": sample_tokens,
                       "seed": seed, "prompts": {t: len(p) for t, p in prompts.items()},
                       "architecture": tap.descriptor.name})
    return stats


def task_prompts(tasks: Sequence[str], n: int, split: str = "validation", seed: int = 0) -> dict[str, list[str]]:
    """``{task: [n formatted prompts]}`` from the task suite (the same prompts for every model)."""
    from expertkit.tasks.base import get_task

    out = {}
    for name in tasks:
        task = get_task(name)
        out[name] = [task.format_prompt(e) for e in task.examples(split, n, seed)]
    return out


def stats_key(fingerprint: str, prompts: Mapping[str, Sequence[str]], **settings: Any) -> str:
    """Cache key of a statistics pass: model fingerprint, the prompts themselves, the settings."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(json.dumps({"fp": fingerprint, "settings": settings}, sort_keys=True).encode())
    for task in sorted(prompts):
        h.update(task.encode() + b"\x00")
        for p in prompts[task]:
            h.update(hashlib.sha256(p.encode()).digest())
    return h.hexdigest()[:24]


def routing_stats(
    source: Any,
    tasks: Sequence[str],
    *,
    n: int = 64,
    split: str = "validation",
    seed: int = 0,
    batch_size: int = 8,
    max_tokens: int = 256,
    sample_tokens: int = 16,
    cache: bool = True,
) -> RoutingStats:
    """Cached :func:`collect_routing_stats` of a model source over ``n`` prompts of each task."""
    from expertkit.models.bundled import cache_root
    from expertkit.models.loader import LoadedModel, load_model
    from expertkit.weights.fingerprint import model_digest

    if not tasks:
        raise ConfigError("give at least one task for routing statistics (e.g. --task family_relation).")
    prompts = task_prompts(tasks, n, split, seed)
    loaded = source if isinstance(source, LoadedModel) else load_model(source)
    # every byte, not the folder's sampled fingerprint: MoEs differing only in their routers must differ
    fp = model_digest(loaded.model)
    settings = {"batch_size": batch_size, "max_tokens": max_tokens, "sample_tokens": sample_tokens, "seed": seed}
    path = cache_root() / "moe-stats" / f"{stats_key(fp, prompts, **settings)}.npz"
    if cache and path.exists() and path.with_suffix(".json").exists():
        return RoutingStats.load(path)
    stats = collect_routing_stats(loaded.model, loaded.tokenizer, prompts, **settings)
    stats.meta.update({"model": str(loaded.name), "fingerprint": fp, "split": split, "n": n})
    if cache:
        stats.save(path)
    return stats

