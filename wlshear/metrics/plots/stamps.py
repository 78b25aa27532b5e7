"""Stamp images: a grid of stamps as the CNN sees them, and reading a PNG back for image loggers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wlshear.metrics.plots._figure import plt, save

__all__ = ["plot_stamp_grid", "read_png"]


def plot_stamp_grid(stamps, path, ncols: int = 8, titles=None, normalise: bool = True,
                    cmap: str = "gray") -> Path:
    """Grid of stamps (axis 0 = y drawn upwards, origin lower), each normalised to mean 0, std 1
    (as the CNN sees them) when ``normalise`` is True; like the paper's Figure 6."""
    arr = np.asarray(stamps, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    n = arr.shape[0]
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, 1.4 * nrows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        img = arr[i]
        if normalise:
            sd = np.nanstd(img)
            img = (img - np.nanmean(img)) / (sd if sd > 0 else 1.0)
        ax.imshow(img, origin="lower", cmap=cmap, interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=6)
    fig.subplots_adjust(wspace=0.05, hspace=0.25)
    return save(fig, path)


def read_png(path) -> np.ndarray:
    """An RGB ``(H, W, 3)`` float array of a PNG written by these functions (TensorBoard images)."""
    import matplotlib.image as mpimg

    return mpimg.imread(str(path))[..., :3]
