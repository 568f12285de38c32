"""Plots for run reports (matplotlib, headless)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def heatmap(
    values: Sequence[Sequence[float | None]],
    rows: Sequence[str],
    cols: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    label: str = "accuracy",
    highlight: Sequence[tuple[int, int]] = (),
) -> Path:
    """Save a rows x cols heatmap of values in [0, 1] as PNG (written atomically).

    ``None`` cells are drawn empty; ``highlight`` cells (row, col) get a frame, e.g. each
    expert on its own task.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    fig_w = max(4.0, 1.1 * len(cols) + 2.5)
    fig_h = max(2.5, 0.55 * len(rows) + 1.6)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center",
                        color="black" if data[i, j] > 0.6 else "white", fontsize=9)
    for i, j in highlight:
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax, label=label, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
