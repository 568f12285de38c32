"""Heatmaps of routing statistics: layer x expert usage, and task x expert profiles."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from expertkit.moe.stats import RoutingStats


def _heatmap(matrix: np.ndarray, labels: Sequence[str], ylabel: str, title: str, cmap: str, height: float,
             path: Path) -> Path:
    """Write one experts-as-columns heatmap (PNG, atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from expertkit.fileio import write_atomic

    n_rows, n_experts = matrix.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.5 * n_experts, 1.0 + height * max(1, n_rows)))
    try:
        im = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=0, vmax=max(float(matrix.max(initial=0)), 1e-9))
        ax.set_xlabel("expert")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(n_experts))
        step = max(1, n_rows // 16)
        ax.set_yticks(range(0, n_rows, step), [labels[i] for i in range(0, n_rows, step)])
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.05)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        write_atomic(path, buf.getvalue())
    finally:
        plt.close(fig)
    return path


def usage_heatmap(stats: RoutingStats, path: str | os.PathLike[str]) -> Path:
    """``path`` (PNG): share of routing decisions per expert (columns) in each layer (rows)."""
    title = (f"routing share per expert (uniform = {1 / stats.num_experts:.3f}; "
             f"CV {stats.balance_cv().mean():.2f})")
    return _heatmap(stats.frequencies(), stats.layers, "layer", title, "viridis", 0.22, Path(path))


def task_heatmap(stats: RoutingStats, path: str | os.PathLike[str]) -> Path:
    """``path`` (PNG): each task's routing share per expert, averaged over layers."""
    tasks = sorted(stats.task_counts)
    rows = [(c / np.maximum(c.sum(axis=1, keepdims=True), 1)).mean(axis=0)  # (E,) mean over layers of (L, E)
            for c in (stats.task_counts[t] for t in tasks)]
    matrix = np.array(rows) if rows else np.zeros((0, stats.num_experts))
    h, hc = stats.marginal_entropy().mean(), np.nanmean(stats.conditional_entropy())
    title = f"routing share per task (mean over layers); H(E) {h:.2f} bits, H(E|task) {hc:.2f} bits"
    return _heatmap(matrix, tasks, "task", title, "magma", 0.35, Path(path))
