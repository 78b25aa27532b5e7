"""Plots of a sweep (``python -m wlshear.tasks.summarize``): sigma and m against the noise level."""

from __future__ import annotations

from pathlib import Path

from wlshear.metrics.plots._figure import plt, save

__all__ = ["plot_learning_curve", "plot_summary"]


def plot_summary(rows: list[dict], path: Path, group_by: str = "model", x: str = "noise_scale") -> Path:
    """sigma and m (component averages) vs ``x`` with one line per ``group_by`` value."""
    ok = [r for r in rows if r["status"] == "ok" and r.get(x) is not None and r.get("sigma") is not None]
    fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6))
    groups: dict[str, list[dict]] = {}
    for r in ok:
        groups.setdefault(str(r.get(group_by)), []).append(r)
    for name, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: float(r[x]))
        xs = [float(r[x]) for r in rs]
        ax_s.plot(xs, [r["sigma"] for r in rs], "o-", label=name)
        ax_m.plot(xs, [r["m"] for r in rs], "o-", label=name)
    ax_s.set_xlabel(f"{x} (x CLASH noise)" if x == "noise_scale" else x)
    ax_m.set_xlabel(f"{x} (x CLASH noise)" if x == "noise_scale" else x)
    ax_s.set_ylabel(r"$\sigma$ (calibrated, per galaxy)")
    ax_m.set_ylabel(r"$m = (m_1 + m_2) / 2$")
    ax_m.axhline(0.0, color="0.6", lw=0.8)
    for ax in (ax_s, ax_m):
        ax.grid(alpha=0.3)
    if groups:
        ax_s.legend(title=group_by, fontsize=8)
    else:
        ax_s.text(0.5, 0.5, "no complete jobs", ha="center", va="center", transform=ax_s.transAxes)
    fig.tight_layout()
    return save(fig, path, dpi=120, tight=False)


def plot_learning_curve(curves: dict, path: Path, fits: dict | None = None) -> Path:
    """Validation sigma (component average) against training stamps, one line per run name in
    ``curves`` (``{name: (stamps, sigma)}``); ``fits``: optional ``{name: (stamps, model_sigma)}``
    drawn dashed (e.g. a power-law extrapolation)."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, (n, s) in curves.items():
        line, = ax.plot(n, s, "o-", ms=3, label=name)
        if fits and name in fits:
            ax.plot(*fits[name], "--", color=line.get_color(), lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training stamps")
    ax.set_ylabel("validation sigma (mean of g1, g2)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_ylim(top=float(np.nanmax([np.nanmax(s) for _, s in curves.values()])) * 1.02)
    fig.tight_layout()
    return save(fig, path)
