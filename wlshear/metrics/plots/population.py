"""A galaxy population's shape distributions against reference fits (e.g. COSMOS)."""

from __future__ import annotations

import numpy as np

from wlshear.metrics.plots._figure import plt, save

_LABELS = {
    "sersic_n": ("single-Sersic index n", (0.3, 6.0)),
    "sersic_g": ("single-Sersic |g|", (0.0, 0.9)),
    "disk_q": ("disk axis ratio q", (0.0, 1.0)),
    "bulge_q": ("bulge axis ratio q", (0.0, 1.0)),
    "bulge_frac": ("bulge-to-total", (0.0, 1.0)),
    "bulge_hlr_ratio": ("bulge / disk half-light radius", (0.0, 1.5)),
    "dpa_deg": ("|PA bulge - PA disk| [deg]", (0.0, 90.0)),
}


def plot_population(ours: dict, reference: dict, path, labels=("population", "COSMOS fits"), bins: int = 20):
    """One panel per statistic present in both dicts: normalised histograms of ``ours`` (filled)
    and ``reference`` (step), with medians in the legend."""
    keys = [k for k in _LABELS if k in ours and k in reference]
    ncol = 4
    nrow = int(np.ceil(len(keys) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
    for ax, key in zip(axes.ravel(), keys):
        name, rng = _LABELS[key]
        edges = np.linspace(*rng, bins + 1)
        for vals, lab, kw in ((ours[key], labels[0], {"alpha": 0.5}), (reference[key], labels[1], {"histtype": "step", "lw": 1.6})):
            v = np.asarray(vals, float)
            v = v[np.isfinite(v)]
            ax.hist(np.clip(v, *rng), bins=edges, density=True, label=f"{lab} (median {np.median(v):.2f}, N={len(v)})", **kw)
        ax.set_xlabel(name)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return save(fig, path)
