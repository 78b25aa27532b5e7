"""Shear-estimation plots: estimated vs true shear, per-bin bias, study curves, conditional bias."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import NullFormatter

from wlshear.metrics.bias import fit_bias, valid_rows
from wlshear.metrics.plots._figure import plt, save

__all__ = ["plot_shear_scatter", "plot_bin_bias", "plot_study", "plot_shear_bins", "plot_conditional"]


def plot_shear_scatter(g_true, g_est, path, failed=None, title: str | None = None,
                       hexbin: bool | None = None, lim: float = 0.3) -> Path:
    """Estimated vs true shear for g1 and g2 with the fitted line g_est = (1 + m) g + c.

    Uses a hexbin density for more than 2000 valid points (or when ``hexbin=True``), a scatter
    otherwise. The legend gives the fitted m, c and the calibrated RMS sigma.
    """
    g_true = np.asarray(g_true, dtype=np.float64)
    g_est = np.asarray(g_est, dtype=np.float64)
    ok = valid_rows(g_true, g_est, failed)
    fit = fit_bias(g_true, g_est, failed=failed)
    use_hex = (ok.sum() > 2000) if hexbin is None else hexbin
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    xs = np.linspace(-lim, lim, 2)
    for k, ax in enumerate(axes):
        x, y = g_true[ok, k], g_est[ok, k]
        if use_hex:
            ax.hexbin(x, y, gridsize=40, extent=(-lim, lim, -2 * lim, 2 * lim), mincnt=1,
                      cmap="viridis", bins="log")
        else:
            ax.scatter(x, y, s=4, alpha=0.5)
        ax.plot(xs, xs, "k--", lw=1, label="y = x")
        if np.isfinite(fit.m[k]):
            ax.plot(xs, (1 + fit.m[k]) * xs + fit.c[k], "r-", lw=1.5,
                    label=f"m={fit.m[k]:+.3f}±{fit.m_err[k]:.3f}\nc={fit.c[k]:+.4f}\n"
                          f"σ={fit.sigma[k]:.3f}")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-2 * lim, 2 * lim)
        ax.set_xlabel(f"true g{k + 1}")
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("estimated g")
    fig.suptitle(title or f"n={fit.n}, failed={fit.n_failed}")
    return save(fig, path)


def plot_bin_bias(rows: list[dict], path, title: str | None = None, label_key: str = "estimator") -> Path:
    """m1 and m2 with errors per bin (``lo``-``hi``) for each estimator: one panel per component.

    ``rows``: dicts with ``lo``, ``hi``, ``m1``, ``m1_err``, ``m2``, ``m2_err`` and ``label_key``.
    A grey band marks |m| < 0.01.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    names = list(dict.fromkeys(r[label_key] for r in rows))
    for j, ax in enumerate(axes, start=1):
        ax.axhspan(-0.01, 0.01, color="0.85", zorder=0)
        ax.axhline(0, color="k", lw=0.8)
        for k, name in enumerate(names):
            rr = [r for r in rows if r[label_key] == name and np.isfinite(r.get(f"m{j}", np.nan))]
            if not rr:
                continue
            x = np.array([0.5 * (r["lo"] + r["hi"]) for r in rr]) + 0.06 * (k - len(names) / 2)
            ax.errorbar(x, [r[f"m{j}"] for r in rr], yerr=[r[f"m{j}_err"] for r in rr], fmt="o-", ms=4,
                        capsize=2, label=name)
        ax.set_xlabel("bin (e.g. F814W magnitude)")
        ax.set_ylabel(f"m{j}")
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def _stat_key(stat: str, k: int, suffix: str = "") -> str:
    """Row key of a statistic for component ``k``: ("sigma_fixed", 1) -> "sigma1_fixed"."""
    base, _, rest = stat.partition("_")
    return f"{base}{k}" + (f"_{rest}" if rest else "") + suffix


def plot_study(rows: list[dict], x_key: str, path: Path, xlabel: str,
               stats=("sigma", "sigma_fixed", "m")) -> Path:
    """Per-estimator curves of ``stats`` vs ``x_key`` (component 1 solid, 2 dashed): the rows of
    the evaluate studies that vary one setting (centroid shift, background, noise level, magnitude)."""
    key = _stat_key
    stats = [s for s in stats if any(np.isfinite(r.get(key(s, 1), np.nan)) for r in rows)]
    fig, axes = plt.subplots(1, len(stats), figsize=(4.6 * len(stats), 3.9), squeeze=False)
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    for ax, stat in zip(axes[0], stats):
        for j, name in enumerate(names):
            rr = [r for r in rows if r["estimator"] == name]
            x = np.array([r[x_key] for r in rr], dtype=float)
            for k, ls in ((1, "-"), (2, "--")):
                y = np.array([r.get(key(stat, k), np.nan) for r in rr], dtype=float)
                e = np.array([r.get(key(stat, k, "_err"), np.nan) for r in rr], dtype=float)
                ax.errorbar(x, y, yerr=np.where(np.isfinite(e), e, 0), color=f"C{j % 10}", ls=ls,
                            marker="o", ms=3, capsize=2, label=f"{name} {k}")
        if stat == "m":
            ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel({"sigma": "sigma (recalibrated)", "sigma_fixed": "sigma (test-set calibration)"}.get(stat, stat))
        ax.legend(fontsize=6, ncol=2)
    return save(fig, path, dpi=110)


def plot_shear_bins(rows: list[dict], path: Path) -> Path:
    """Per-estimator m, mean calibrated residual and sigma vs the true shear (``shear_bin_rows``)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), squeeze=False)
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    for ax, stat in zip(axes[0], ("m", "delta", "sigma")):
        for j, name in enumerate(names):
            for k, ls in ((1, "-"), (2, "--")):
                rr = [r for r in rows if r["estimator"] == name and r["component"] == k]
                x = np.array([r["g_mean"] for r in rr], dtype=float)
                y = np.array([r[stat] for r in rr], dtype=float)
                e = np.array([r[f"{stat}_err"] for r in rr], dtype=float)
                ax.errorbar(x, y, yerr=np.where(np.isfinite(e), e, 0), color=f"C{j % 10}", ls=ls,
                            marker="o", ms=3, capsize=2, label=f"{name} g{k}")
        if stat == "m":
            ax.axhline(0, color="k", lw=0.8)
            finite = [r["m"] for r in rows if np.isfinite(r["m"])]
            if finite and np.max(np.abs(finite)) > 1:
                ax.set_ylim(-1, 1)
        ax.set_xlabel("true shear (component of the row)")
        if stat == "delta":
            ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel({"m": "m (global c; from pair means)",
                       "delta": "mean calibrated residual <g_cal - g>",
                       "sigma": "sigma (global calibration)"}[stat])
        ax.legend(fontsize=6, ncol=2)
    return save(fig, path, dpi=110)


def plot_conditional(rows: list[dict], path, stats=None) -> Path:
    """Grid of panels: one column per observable, one row per statistic (component 1 solid, 2 dashed).

    Default stats: ``m`` and ``sigma_fixed`` (per-galaxy error with the fixed calibration) when the
    rows have it, else ``sigma`` (recalibrated per bin)."""
    if stats is None:
        has_fixed = any(np.isfinite(r.get("sigma1_fixed", np.nan)) for r in rows)
        stats = ("m", "sigma_fixed" if has_fixed else "sigma")
    labels = {"m": "m (ring-pair fit)", "sigma": "sigma (recalibrated per bin)",
              "sigma_fixed": "sigma (fixed calibration)"}
    key = _stat_key

    obs = list(dict.fromkeys(r["observable"] for r in rows))
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    fig, axes = plt.subplots(len(stats), len(obs), figsize=(4.4 * len(obs), 3.4 * len(stats)), squeeze=False)
    for i, stat in enumerate(stats):
        for j, o in enumerate(obs):
            ax = axes[i][j]
            for e, name in enumerate(names):
                rr = [r for r in rows if r["observable"] == o and r["estimator"] == name]
                xs = np.array([r["x_mean"] for r in rr], dtype=float)
                for k, ls in ((1, "-"), (2, "--")):
                    y = np.array([r.get(key(stat, k), np.nan) for r in rr], dtype=float)
                    err = np.array([r.get(key(stat, k, "_err"), np.nan) for r in rr], dtype=float)
                    ax.errorbar(xs + 0.01 * e * (np.nanmax(xs) - np.nanmin(xs) if len(xs) > 1 else 0), y,
                                yerr=np.where(np.isfinite(err), err, 0), color=f"C{e % 10}", ls=ls, marker="o",
                                ms=3, capsize=2, label=f"{name} {k}" if (i == 0 and j == 0) else None)
            if stat == "m":
                ax.axhline(0, color="k", lw=0.8)
            if o in ("hlr_px", "snr"):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"measured {o} (bin mean of pair means)")
            ax.set_ylabel(labels.get(stat, stat))
    if names:
        fig.legend(loc="upper center", ncol=min(6, 2 * len(names)), fontsize=7, bbox_to_anchor=(0.5, 1.0 + 0.02 * len(names)))
    fig.tight_layout()
    return save(fig, path, dpi=110)
