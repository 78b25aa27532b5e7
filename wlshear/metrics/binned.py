"""Bias and scatter statistics in bins of any quantity (magnitude, half-light radius, S/N, ...).

:func:`binned_bias` returns a list of flat dicts, one per bin, with the bin edges, the mean of
the binned quantity, and per component n, m, m_err, c, c_err, sigma, sigma_err (see
:mod:`wlshear.metrics.bias`). :func:`to_csv` and :func:`to_markdown` write such rows.

Rows whose binned quantity is not finite or lies outside all bins are ignored; failed estimates
inside a bin are counted in that bin's ``n_failed``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .bias import fit_bias

__all__ = ["bin_edges", "binned_bias", "to_csv", "to_markdown"]


def bin_edges(x, bins=5) -> np.ndarray:
    """Bin edges: ``bins`` given as explicit edges (increasing array) or as a number of
    equal-count (quantile) bins of the finite values of ``x``."""
    if np.ndim(bins) == 0:
        nb = int(bins)
        if nb < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        xf = np.asarray(x, dtype=np.float64)
        xf = xf[np.isfinite(xf)]
        if xf.size == 0:
            raise ValueError("cannot make quantile bins: no finite values in x")
        return np.quantile(xf, np.linspace(0.0, 1.0, nb + 1))
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("bin edges must be a 1-D strictly increasing array with >= 2 values")
    return edges


def bin_index(x, edges) -> np.ndarray:
    """Bin number of each value of ``x`` for ``edges``; the last bin includes its upper edge;
    values outside the edges or not finite get -1."""
    x = np.asarray(x, dtype=np.float64)
    idx = np.searchsorted(edges, x, side="right") - 1
    idx[x == edges[-1]] = len(edges) - 2
    idx[(idx > len(edges) - 2) | ~np.isfinite(x)] = -1
    return idx


def binned_bias(
    x,
    g_true,
    g_est,
    bins=5,
    failed=None,
    bootstrap: int = 0,
    rng=None,
    quantity: str = "x",
    extra: dict | None = None,
) -> list[dict]:
    """Per-bin bias fits.

    Parameters
    ----------
    x : ``(N,)`` quantity to bin by.
    g_true, g_est : ``(N, 2)`` true and estimated shears.
    bins : number of quantile bins or explicit edges. The last bin includes its upper edge.
    failed : optional ``(N,)`` failure flags of the estimator.
    bootstrap, rng : passed to :func:`~wlshear.metrics.bias.fit_bias` (bootstrap errors).
    quantity : name of the binned quantity, used as the prefix of the bin columns.
    extra : constant columns to add to every row (e.g. ``{"estimator": "moments"}``).

    Returns
    -------
    list of dicts with keys ``{quantity}_lo``, ``{quantity}_hi``, ``{quantity}_mean``, ``n``,
    ``n_failed``, ``m1``, ``m1_err``, ``m2``, ..., ``sigma2_err``.
    """
    x = np.asarray(x, dtype=np.float64)
    g_true = np.asarray(g_true, dtype=np.float64)
    g_est = np.asarray(g_est, dtype=np.float64)
    if x.shape != (len(g_true),):
        raise ValueError(f"x must have shape ({len(g_true)},), got {x.shape}")
    failed = np.zeros(len(x), bool) if failed is None else np.asarray(failed, dtype=bool)
    edges = bin_edges(x, bins)
    idx = bin_index(x, edges)
    gen = np.random.default_rng(rng)
    rows = []
    for b in range(len(edges) - 1):
        sel = idx == b
        row = dict(extra or {})
        row[f"{quantity}_lo"] = float(edges[b])
        row[f"{quantity}_hi"] = float(edges[b + 1])
        row[f"{quantity}_mean"] = float(np.mean(x[sel])) if sel.any() else float("nan")
        fit = fit_bias(g_true[sel], g_est[sel], failed=failed[sel], bootstrap=bootstrap, rng=gen)
        row.update(fit.as_dict())
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def to_csv(rows: list[dict], path) -> Path:
    """Write rows (list of flat dicts) to a CSV file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def _fmt(v, floatfmt: str) -> str:
    if isinstance(v, (float, np.floating)):
        return format(float(v), floatfmt)
    return str(v)


def to_markdown(rows: list[dict], floatfmt: str = ".4g", columns: list[str] | None = None) -> str:
    """Rows as a GitHub-flavoured Markdown table (string)."""
    cols = columns or _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, ""), floatfmt) for c in cols) + " |")
    return "\n".join(lines) + "\n"
