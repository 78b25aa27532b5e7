"""Diagnostic plots (matplotlib, Agg backend): shear scatter, binned statistics, stamp grids.

Every function takes arrays and an output path, writes the figure there (format from the file
suffix) and returns the path as a :class:`pathlib.Path`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .bias import fit_bias, valid_rows  # noqa: E402

__all__ = ["plot_shear_scatter", "plot_binned", "plot_stamp_grid", "plot_bin_bias"]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


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
    return _save(fig, path)


def plot_binned(results: dict[str, list[dict]], path, quantity: str = "x",
                stats: tuple[str, ...] = ("sigma", "m"), xlabel: str | None = None) -> Path:
    """Binned statistics vs a quantity for several estimators.

    ``results`` maps an estimator name to the rows of
    :func:`wlshear.metrics.binned.binned_bias` (binned with the same ``quantity`` name). One panel
    per statistic in ``stats`` (any of "sigma", "m", "c"), components 1 (solid) and 2 (dashed),
    with error bars.
    """
    fig, axes = plt.subplots(1, len(stats), figsize=(4.5 * len(stats), 3.8), squeeze=False)
    for ax, stat in zip(axes[0], stats):
        for j, (name, rows) in enumerate(results.items()):
            x = np.array([r[f"{quantity}_mean"] for r in rows])
            color = f"C{j}"
            for k, ls in ((1, "-"), (2, "--")):
                y = np.array([r[f"{stat}{k}"] for r in rows])
                e = np.array([r[f"{stat}{k}_err"] for r in rows])
                ax.errorbar(x, y, yerr=e, color=color, ls=ls, marker="o", ms=3, capsize=2,
                            label=f"{name} {stat}{k}")
        if stat in ("m", "c"):
            ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel(xlabel or quantity)
        ax.set_ylabel(stat)
        ax.legend(fontsize=7)
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)
