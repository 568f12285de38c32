"""The streaming compression pass: one new expert in memory at a time, straight into the output folder.

:func:`compress_checkpoint` walks the source checkpoint tensor by tensor. Every tensor outside the
MoE layers is copied file to file in the kernel (its bytes never enter memory); at the first tensor
of an MoE layer the method plans the layer from the routing statistics
(:mod:`~expertkit.moe.compress.base`), then each new expert is made from its members, read one at a
time (:class:`~expertkit.moe.compress.layers.MoeCheckpoint`), factored by the C step when asked
(:mod:`~expertkit.moe.compress.lowrank`) and written before the next one is made. Peak memory: a
few expert matrices plus the routing statistics, below one layer's experts (measured in
docs/benchmarks.md).

The folder (see :mod:`expertkit.moe.compressed` for its format) is installed atomically with
``compress.json`` (what was done, groups per layer, parameter and FLOP counts). When every layer
keeps the same number of experts, at least top-k, a stock transformers model is written beside it in
``stock/``: pruned routers as they are (exact), merged groups' router rows combined by the members'
frequency-weighted mean (an approximation of group routing), factored experts multiplied out.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expertkit.errors import ConfigError
from expertkit.moe.compress.base import METHODS, LayerInput, LayerPlan, MethodParams
from expertkit.moe.compress.layers import PARTS, MoeCheckpoint, router_weight
from expertkit.moe.compress.lowrank import factorize, split_budget
from expertkit.moe.compressed import FACTORS, FORMAT, LAYOUT_KEY
from expertkit.moe.routing import layer_name

RECORD = "compress.json"


@dataclass
class LayerStats:
    """The routing statistics a method may use, ``(L, ...)`` arrays in the checkpoint's layer order."""

    frequencies: np.ndarray  # (L, E)
    logit_similarity: np.ndarray  # (L, E, E)
    output_mean: np.ndarray | None = None  # (L, E, H)
    reap: np.ndarray | None = None  # (L, E)
    layers: list[str] | None = None  # layer names, checked against the checkpoint's when given

    @classmethod
    def from_routing(cls, stats: Any, reap: np.ndarray | None = None) -> LayerStats:
        """From a :class:`~expertkit.moe.RoutingStats` (output sums become means)."""
        mean = None
        if stats.output_mean.shape[-1]:
            mean = stats.output_mean / np.maximum(stats.output_tokens, 1)[:, None, None]
        return cls(stats.frequencies(), stats.logit_similarity(), mean, reap, list(stats.layers))


@dataclass
class CompressResult:
    """A written compressed MoE and what was done."""

    path: Path
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def stock(self) -> Path | None:
        """The stock transformers form, when one was written."""
        return self.path / "stock" if self.record.get("stock") else None


def write_layer(moe: MoeCheckpoint, key: Any, plan: LayerPlan, router: dict[str, torch.Tensor],
                lowrank: tuple[float, float] | None, dtype: torch.dtype, frequencies: np.ndarray,
                writers: list[Any]) -> dict[str, Any]:
    """Make and write one compressed layer, one new expert at a time; returns its layout entry.

    ``writers[0]`` gets the compressed form, ``writers[1]`` (when given) the stock form;
    ``frequencies (E,)`` weigh the members' router rows in the stock form.
    """
    from expertkit.moe.compress.base import weighted_merge
    from expertkit.procmem import release_free_memory

    tmpl = moe.templates()
    layer = key[1]
    g = len(plan.groups)
    params = 0
    ranks: dict[str, int] = {}
    columns: dict[str, int] = {}
    errors: dict[str, list[float]] = {p: [] for p in PARTS}
    for e in range(g):
        made = plan.parts(e)
        for p in PARTS:  # one new matrix in memory at a time (not zip: it keeps its last items until the next)
            w = next(made)
            dense_name = tmpl[p].format(layer=layer, expert=e, suffix="weight")
            if lowrank is None:
                t = w.to(dtype).contiguous()
                for wr in writers:
                    wr.add(dense_name, t)
                params += w.numel()
                del t, w
                continue
            f = factorize(w, *split_budget(w.shape[0], w.shape[1], *lowrank))
            for suffix, t in zip(FACTORS, (f.a, f.b, f.values, f.index), strict=True):
                writers[0].add(tmpl[p].format(layer=layer, expert=e, suffix=suffix),
                               t if suffix == "sparse_index" else t.to(dtype))
            params += f.parameters()
            ranks[p], columns[p] = f.a.shape[0], f.index.numel()
            dense = f.dense()
            # ||W - (B A + S)||_F / ||W||_F: how much of each matrix the C step keeps (a model's flat
            # spectra show here long before its accuracy is measured); averaged per part below
            errors[p].append(float((dense.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12)))
            if len(writers) > 1:
                writers[1].add(dense_name, dense.to(dtype))
            del f, dense, w
        release_free_memory()  # what the allocator kept of this expert's temporaries, not just what is alive
    for name, t in router.items():
        rows = t if plan.routing == "group" else t[[m[0] for m in plan.groups]]
        writers[0].add(name, rows.to(dtype).contiguous())
        if len(writers) < 2:
            continue
        if plan.routing == "prune":
            writers[1].add(name, rows.to(dtype).contiguous())
        else:  # combined rows for the stock form: frequency-weighted mean of each group's members
            writers[1].add(name, torch.stack([weighted_merge(t[m], frequencies[m]) for m in plan.groups]).to(dtype))
    entry: dict[str, Any] = {"experts": g, "routing": plan.routing, "groups": plan.groups,
                             "factored": lowrank is not None, "expert_parameters": params}
    if plan.routing == "group":
        entry["group_map"] = plan.group_map(len(frequencies))
    if lowrank is not None:
        entry["ranks"], entry["columns"] = ranks, columns
        entry["relative_error"] = {p: float(np.mean(errors[p])) for p in PARTS}
    return entry


def compress_checkpoint(source: str | os.PathLike[str], out: str | os.PathLike[str], *, method: str,
                        params: MethodParams, stats: LayerStats, keep: list[int],
                        lowrank: tuple[float, float] | None = None, stock: bool = True, seed: int = 0,
                        overwrite: bool = False, extra: dict[str, Any] | None = None) -> CompressResult:
    """Compress the MoE at ``source`` into ``out``, streaming one new expert at a time (see the module docstring)."""
    from expertkit.fileio import install_folder, write_atomic
    from expertkit.procmem import mapped_large_allocations
    from expertkit.progress import track
    from expertkit.weights import Checkpoint, ShardedWriter

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder exists: {out}. Choose another path or pass --overwrite.")
    fn = METHODS.get(method)
    began = time.perf_counter()
    # big temporaries mapped, so freed ones leave the resident set (expertkit.procmem; measured, bench/moe_compress.py)
    with mapped_large_allocations(), Checkpoint(Path(source)) as ckpt:
        moe = MoeCheckpoint(ckpt)
        keys = list(moe.layers)
        if len(keep) != len(keys) or stats.frequencies.shape[0] != len(keys):
            raise ConfigError(f"{len(keys)} MoE layers, but {len(keep)} expert counts and "
                              f"{stats.frequencies.shape[0]} layers of statistics were given.")
        bad = [(str(k[1]), n) for k, n in zip(keys, keep, strict=True) if not 1 <= n <= moe.num_experts]
        if bad:
            raise ConfigError(f"layer {bad[0][0]} is asked to keep {bad[0][1]} experts; each layer keeps 1 to "
                              f"{moe.num_experts} (the model's expert count).")
        if stats.layers is not None and stats.layers != [str(k[1]) for k in keys]:
            raise ConfigError(f"the statistics describe layers {stats.layers[:4]}..., the checkpoint "
                              f"{[str(k[1]) for k in keys][:4]}...; collect them on this model.")
        uniform = len(set(keep)) == 1 and keep[0] >= moe.top_k
        write_stock = stock and uniform
        layer_of = {n: k for k, names in moe.layers.items()
                    for n in [*(x for p in names.experts.values() for x in p.values()), *names.router]}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        layout: dict[str, Any] = {"format": FORMAT, "method": method, "source_experts": moe.num_experts,
                                  "templates": moe.templates(), "layers": {}}
        rng = np.random.default_rng(seed)
        try:
            writers = [ShardedWriter(tmp / "model", template=source, max_shard_size="2GB")]
            if write_stock:
                writers.append(ShardedWriter(tmp / "stock", template=source, max_shard_size="2GB"))
            done: set[Any] = set()
            for name in track(ckpt.names(), f"Compressing ({method})"):
                key = layer_of.get(name)
                if key is None:  # copied file to file: a big tensor (the embedding) never enters memory
                    for w in writers:
                        w.add_from(name, ckpt)
                    continue
                if key in done:
                    continue
                i = keys.index(key)
                router = moe.read_router(key)
                layer = LayerInput(layer_name(key), moe.experts(key), router_weight(router), stats.frequencies[i],
                                   stats.logit_similarity[i],
                                   None if stats.output_mean is None else stats.output_mean[i],
                                   None if stats.reap is None else stats.reap[i], keep[i], rng)
                plan = fn(layer, params)
                if plan.routing == "prune" and len(plan.groups) < moe.top_k:  # the router could not pick top-k
                    raise ConfigError(f"{method} keeps {len(plan.groups)} experts in layer {key[1]}, fewer than the "
                                      f"model's top-k ({moe.top_k}): a pruned router cannot route a token to "
                                      f"{moe.top_k} experts; keep at least {moe.top_k} per layer (min_experts).")
                layout["layers"][str(key[1])] = write_layer(moe, key, plan, router, lowrank, moe.dtype(key),
                                                            stats.frequencies[i], writers)
                done.add(key)
                del layer, plan, router
            for w in writers:
                w.finish()
            record = _record(moe, layout, keep, method, params, lowrank, write_stock, began, extra)
            _write_config(tmp / "model", moe, layout, keep)
            if write_stock:
                _write_config(tmp / "stock", moe, None, keep)
                os.replace(tmp / "stock", tmp / "model" / "stock")
            write_atomic(tmp / "model" / RECORD, json.dumps(record, indent=1) + "\n")
            install_folder(tmp / "model", out)
        except BaseException:
            for w in locals().get("writers", []):
                w.abort()
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return CompressResult(out, record)


def _write_config(folder: Path, moe: MoeCheckpoint, layout: dict[str, Any] | None, keep: list[int]) -> None:
    from expertkit.fileio import write_atomic

    config = json.loads((folder / "config.json").read_text())
    for key in moe.descriptor.counts.experts:
        if isinstance(config.get(key), int):
            config[key] = max(keep)
    config.pop(LAYOUT_KEY, None)
    if layout is not None:
        config[LAYOUT_KEY] = layout
    write_atomic(folder / "config.json", json.dumps(config, indent=2) + "\n")


def _record(moe: MoeCheckpoint, layout: dict[str, Any], keep: list[int], method: str, params: MethodParams,
            lowrank: tuple[float, float] | None, stock: bool, began: float, extra: dict[str, Any] | None) -> dict:
    first = next(iter(moe.layers.values())).experts[0]
    per_expert = sum(int(np.prod(moe.shapes[first[p]])) for p in PARTS)  # 3 I H
    before = per_expert * moe.num_experts * len(moe.layers)
    after = sum(e["expert_parameters"] for e in layout["layers"].values())
    flops_before = 2 * per_expert * moe.top_k * len(moe.layers)  # per token, multiply-adds x 2
    flops_after = sum(2 * e["expert_parameters"] / e["experts"] * moe.top_k for e in layout["layers"].values())
    errors = [e["relative_error"] for e in layout["layers"].values() if "relative_error" in e]
    error = {p: float(np.mean([e[p] for e in errors])) for p in PARTS} if errors else None
    return {"format": "expertkit-moe-compress-v1", "method": method, "params": params.model_dump(mode="json"),
            "experts_per_layer": keep, "source_experts": moe.num_experts, "top_k": moe.top_k,
            "lowrank": None if lowrank is None else {"keep": lowrank[0], "sparse_share": lowrank[1],
                                                      "relative_error": error},
            "expert_parameters": {"before": before, "after": after, "removed_share": 1 - after / before},
            "expert_flops_per_token": {"before": flops_before, "after": flops_after,
                                       "removed_share": 1 - flops_after / flops_before},
            "stock": stock, "stock_exact": stock and all(e["routing"] == "prune" for e in layout["layers"].values()),
            "seconds": time.perf_counter() - began, **(extra or {})}
