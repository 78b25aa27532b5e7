"""Cluster-field plots of the CLASH pipeline: star/galaxy separation, shear sticks, shear profiles.

Drawn on ``matplotlib.figure.Figure`` objects (no pyplot state), so they are safe in worker threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_star_galaxy", "plot_whiskers", "plot_profile", "plot_sigma_vs_scale"]


def _save(fig: Figure, path) -> Path:
    """Lay out and write a cluster figure (110 dpi, format from the suffix); returns the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_star_galaxy(det, is_star, path, star_params: dict | None = None, title: str = "") -> Path:
    """Save a PNG of the (mag, mu_max) and (mag, flux_radius) planes, stars red, galaxies blue."""
    mag = np.asarray(det["mag"], dtype=np.float64)
    mu = np.asarray(det["mu_max"], dtype=np.float64)
    r = np.asarray(det["flux_radius"], dtype=np.float64)
    s = np.asarray(is_star, dtype=bool)
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    for ax, yv, ylab in ((axes[0], mu, r"$\mu_{\max}$ [mag arcsec$^{-2}$]"), (axes[1], r, "half-light radius [px]")):
        ax.scatter(mag[~s], yv[~s], s=3, c="tab:blue", alpha=0.5, label=f"galaxies ({(~s).sum()})")
        ax.scatter(mag[s], yv[s], s=6, c="tab:red", label=f"stars ({s.sum()})")
        ax.set_xlabel("magnitude")
        ax.set_ylabel(ylab)
        ax.legend(loc="best", fontsize=8)
    if star_params is not None and np.isfinite(star_params.get("d_star", np.nan)):
        mm = np.linspace(np.nanmin(mag), np.nanmax(mag), 2) if np.isfinite(mag).any() else np.array([20, 28])
        for sgn in (-1, 0, 1):
            axes[0].plot(mm, mm + star_params["d_star"] + sgn * star_params["d_tol"], "k-" if sgn == 0 else "k:", lw=0.8)
        axes[1].axhline(star_params["r_star_max"], color="k", ls=":", lw=0.8)
    axes[1].set_yscale("log")
    fig.suptitle(title)
    return _save(fig, path)


def plot_whiskers(
    g1map: np.ndarray,
    g2map: np.ndarray,
    grid,
    path,
    every: int | None = None,
    background: np.ndarray | None = None,
    stick_scale: float | None = None,
    title: str = "",
) -> Path:
    """PNG shear-stick plot in image-pixel coordinates on ``grid`` (a ``wlshear.clash.maps.MapGrid``).

    Sticks have length proportional to |g| and position angle 0.5 * atan2(g2, g1) measured from
    the +x axis towards +y (g1 > 0 horizontal). ``every`` thins the grid (default: ~25 sticks
    per side); ``background`` (e.g. the total image) is shown in grey with origin lower;
    ``stick_scale`` = image pixels per unit shear.
    """
    g1map = np.asarray(g1map, dtype=np.float64)
    g2map = np.asarray(g2map, dtype=np.float64)
    if every is None:
        every = max(1, max(grid.shape) // 25)
    xc, yc = grid.centers()
    xs, ys = np.meshgrid(xc[::every], yc[::every])
    g1 = g1map[::every, ::every]
    g2 = g2map[::every, ::every]
    amp = np.hypot(g1, g2)
    phi = 0.5 * np.arctan2(g2, g1)
    if stick_scale is None:
        med = np.nanmax(amp) if np.isfinite(amp).any() and np.nanmax(amp) > 0 else 1.0
        stick_scale = 0.9 * every * grid.step / med
    fig = Figure(figsize=(7, 7))
    ax = fig.subplots()
    if background is not None:
        bg = np.asarray(background, dtype=np.float64)
        lo, hi = np.nanpercentile(bg, [5, 99.5])
        ax.imshow(bg, origin="lower", cmap="gray_r", vmin=lo, vmax=hi)
    ax.quiver(
        xs, ys, amp * np.cos(phi), amp * np.sin(phi), angles="xy", scale_units="xy",
        scale=1.0 / stick_scale, headwidth=0, headlength=0, headaxislength=0, pivot="middle",
        color="tab:red", width=0.003,
    )
    ax.set_xlim(0, grid.nx * grid.step)
    ax.set_ylim(0, grid.ny * grid.step)
    ax.set_aspect("equal")
    ax.set_xlabel("x [px]")
    ax.set_ylabel("y [px]")
    ax.set_title(title or f"shear sticks: length of one stick spacing = |g| {grid.step * every / stick_scale:.3f}")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_profile(path, prof_cnn, prof_base=None, model=None, title: str = "") -> Path:
    """Tangential (g_t) and cross (g_x) shear profiles of the CNN and the baseline vs radius [arcsec]
    (columns ``r_mean``, ``gt``, ``gt_err``, ``gx``, ``gx_err``), with the NFW model ``(r, g_t)``."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for prof, lab, col, off in ((prof_cnn, "CNN", "tab:blue", 0.98), (prof_base, "baseline", "tab:orange", 1.02)):
        if prof is None:
            continue
        ok = np.isfinite(np.asarray(prof["gt"]))
        r = np.asarray(prof["r_mean"])[ok] * off
        ax.errorbar(r, np.asarray(prof["gt"])[ok], np.asarray(prof["gt_err"])[ok], fmt="o", color=col,
                    label=f"{lab} $g_t$", ms=4, capsize=2)
        ax.errorbar(r, np.asarray(prof["gx"])[ok], np.asarray(prof["gx_err"])[ok], fmt="x", color=col,
                    alpha=0.5, label=f"{lab} $g_\\times$", ms=4)
    if model is not None:
        ax.plot(model[0], model[1], "k-", label="NFW input $g_t$")
    ax.axhline(0, color="grey", lw=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("radius [arcsec]")
    ax.set_ylabel("reduced shear")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_sigma_vs_scale(by_scale: dict, path, title: str = "") -> Path:
    """Hold-out per-galaxy error sigma_source (mean of the two components) against the map kernel
    scale lambda [arcsec], one line per estimator: ``{scale: {estimator: {"sigma_source": [s1, s2]}}}``
    (the paper's Fig 16)."""
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()
    scales = sorted(float(s) for s in by_scale)
    names = sorted({k for v in by_scale.values() for k in v})
    for name in names:
        ys = []
        for s in scales:
            row = by_scale.get(s, by_scale.get(str(s), {})).get(name)
            v = np.asarray(row["sigma_source"], dtype=float) if row else np.full(2, np.nan)
            ys.append(float(np.sqrt(np.nanmean(v**2))) if np.isfinite(v).any() else np.nan)
        ax.plot(scales, ys, "o-", label=name)
    ax.set_xlabel(r"map kernel scale $\lambda$ [arcsec]")
    ax.set_ylabel(r"hold-out $\sigma_{source}$")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)
