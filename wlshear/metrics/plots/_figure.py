"""The one place matplotlib is configured: the Agg backend (no display) and saving a figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "save"]


def save(fig, path, dpi: int = 120, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix; parent directories created), close it and
    return the path. ``tight``: crop to the drawn content (``bbox_inches="tight"``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return path
