"""Heatmaps of routing statistics: layer x expert usage, and task x expert profiles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from expertkit.moe.stats import RoutingStats


def _save(fig, path: Path) -> Path:
    from expertkit.fileio import write_atomic
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buf.getvalue())
    return path


def usage_heatmap(stats: RoutingStats, path: str | os.PathLike[str]) -> Path:
    """``path`` (PNG): share of routing decisions per expert (columns) in each layer (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freq = stats.frequencies()  # (L, E)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * stats.num_experts, 1.0 + 0.22 * len(stats.layers)))
    im = ax.imshow(freq, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(freq.max()), 1e-9))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(stats.num_experts))
    step = max(1, len(stats.layers) // 16)
    ax.set_yticks(range(0, len(stats.layers), step), [stats.layers[i] for i in range(0, len(stats.layers), step)])
    uniform = 1 / stats.num_experts
    ax.set_title(f"routing share per expert (uniform = {uniform:.3f}; CV {stats.balance_cv().mean():.2f})")
    fig.colorbar(im, ax=ax, fraction=0.05)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def task_heatmap(stats: RoutingStats, path: str | os.PathLike[str]) -> Path:
    """``path`` (PNG): each task's routing share per expert, averaged over layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(stats.task_counts)
    rows = []
    for t in tasks:
        c = stats.task_counts[t]  # (L, E)
        rows.append((c / np.maximum(c.sum(axis=1, keepdims=True), 1)).mean(axis=0))
    mat = np.array(rows) if rows else np.zeros((0, stats.num_experts))
    fig, ax = plt.subplots(figsize=(1.6 + 0.5 * stats.num_experts, 1.0 + 0.35 * max(1, len(tasks))))
    im = ax.imshow(mat, aspect="auto", cmap="magma", vmin=0)
    ax.set_xlabel("expert")
    ax.set_xticks(range(stats.num_experts))
    ax.set_yticks(range(len(tasks)), tasks)
    h, hc = stats.marginal_entropy().mean(), np.nanmean(stats.conditional_entropy())
    ax.set_title(f"routing share per task (mean over layers); H(E) {h:.2f} bits, H(E|task) {hc:.2f} bits")
    fig.colorbar(im, ax=ax, fraction=0.05)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
