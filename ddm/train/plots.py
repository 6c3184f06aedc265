"""Figures ddm writes (loss curves, titled sample grids), and the one place matplotlib is set up.

matplotlib is imported on first use only: it is slow to import, and most commands (an island's training
step loop, a verifier) never draw anything.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ddm.core.images import make_grid


@functools.cache
def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Writes `fig` to `path` (creating its folder) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **kwargs)
    pyplot().close(fig)
    return path


def plot_loss_curve(rows: list[dict], out_png: str | Path, title: str = "") -> Path | None:
    """Loss vs step of metrics rows ({"step", "loss", ...}) as a PNG; None when there are no rows."""
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png)


def save_strategy_figure(grids: dict[str, np.ndarray], path: str | Path, ncols: int = 8) -> Path:
    """One PNG with a titled sample grid per entry, side by side. grids: title -> uint8 [n, H, W, C]."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), dpi=120, squeeze=False)
    for ax, (name, images) in zip(axes[0], grids.items()):
        grid = make_grid(images, ncols)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
