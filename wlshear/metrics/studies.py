"""Statistics of evaluate.py's studies (``wlshear.tasks.studies``), from estimates on a set.

Every function takes ``estimates``: name -> ``(g (N, 2), failed (N,))`` on one set of stamps with
true shears ``g_true`` (and ring-pair ids ``pair_ids``, or None), and ``cal_of``: name -> the
estimator's calibration ``{m1, c1, m2, c2}`` measured on the main test set (or None). Each returns
rows (dicts) for a CSV and results.json:

- :func:`summary_rows`: m, c (ring-pair fit) and sigma of every estimator on the set, plus
  ``sigma_fixed`` with the main test set's calibration (one row per estimator and setting: the
  centroid, background and noise studies);
- :func:`magnitude_bin_rows`: the same per bin of a stamp meta column (e.g. magnitude);
- :func:`shear_bin_rows`: per component and bin of the true shear, the response m, the mean
  calibrated residual and sigma, all with the global calibration.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from wlshear.metrics.bias import average_pairs, bias_summary, fixed_sigma, valid_rows
from wlshear.metrics.binned import binned_bias

__all__ = ["calibration", "summary_rows", "magnitude_bin_rows", "shear_bin_rows", "SUMMARY_KEYS"]

SUMMARY_KEYS = ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err",
                "sigma1", "sigma1_err", "sigma2", "sigma2_err")
CalOf = Callable[[str], "dict | None"]


def calibration(summary: dict) -> dict:
    """The calibration ``{m1, c1, m2, c2}`` of a :func:`~wlshear.metrics.bias.bias_summary`."""
    return {k: summary[k] for k in ("m1", "c1", "m2", "c2")}


def summary_rows(g_true, estimates: dict, pair_ids, cal_of: CalOf, extra: dict) -> list[dict]:
    """One row per estimator: ``extra`` (the study's setting), m, c, sigma (recalibrated on this set,
    no bootstrap), sigma_fixed (with ``cal_of(name)``), n and n_failed."""
    rows = []
    for name, (g, failed) in estimates.items():
        s = bias_summary(g_true, g, failed, pair_ids, bootstrap=0)
        row = dict(extra)
        row["estimator"] = name
        row.update({k: s[k] for k in SUMMARY_KEYS})
        row.update(fixed_sigma(g_true, g, failed, cal_of(name)))
        row["n"] = int(len(g))
        row["n_failed"] = int(failed.sum())
        rows.append(row)
    return rows


def magnitude_bin_rows(x, g_true, estimates: dict, edges, key: str, cal_of: CalOf) -> list[dict]:
    """:func:`~wlshear.metrics.binned.binned_bias` rows per bin of ``x`` (a meta column named
    ``key``, bins ``edges``; recalibrated per bin) plus ``sigma_fixed`` with ``cal_of(name)``."""
    rows = []
    for name, (g, failed) in estimates.items():
        brs = binned_bias(x, g_true, g, bins=edges, failed=failed, quantity=key, extra={"estimator": name})
        for b, br in enumerate(brs):
            last = b == len(edges) - 2
            sel = (x >= edges[b]) & ((x <= edges[b + 1]) if last else (x < edges[b + 1]))
            br.update(fixed_sigma(g_true[sel], g[sel], failed[sel], cal_of(name)))
        rows += brs
    return rows


def _shear_bin(g_true, g_est, ok, pt, pe, pbad, k, lo, hi, last, cal) -> dict:
    """One row of :func:`shear_bin_rows`: component ``k`` (0-based), true-shear bin [lo, hi)."""
    m0, c0 = cal[f"m{k + 1}"], cal[f"c{k + 1}"]
    x_all, x_p = g_true[:, k], pt[:, k]
    sel = (x_all >= lo) & ((x_all <= hi) if last else (x_all < hi))
    selp = (x_p >= lo) & ((x_p <= hi) if last else (x_p < hi))
    use, usep = sel & ok, selp & ~pbad
    row = {"component": k + 1, "g_lo": float(lo), "g_hi": float(hi),
           "g_mean": float(np.mean(x_all[sel])) if sel.any() else float("nan"),
           "n": int(use.sum()), "n_failed": int((sel & ~ok).sum())}
    r = pe[usep, k] - c0 - (1 + m0) * pt[usep, k]
    npair = r.size
    gm = float(np.mean(pt[usep, k])) if npair else float("nan")
    if npair >= 2:
        rm, re = float(np.mean(r)), float(np.std(r, ddof=1) / math.sqrt(npair))
        row["m"] = m0 + rm / gm if gm != 0 else float("nan")
        row["m_err"] = re / abs(gm) if gm != 0 else float("nan")
        row["delta"] = rm / (1 + m0)
        row["delta_err"] = re / abs(1 + m0)
    else:
        row.update(m=float("nan"), m_err=float("nan"), delta=float("nan"), delta_err=float("nan"))
    res = (g_est[use, k] - c0) / (1 + m0) - g_true[use, k]
    if res.size >= 2:
        s = float(np.sqrt(np.mean(res**2)))
        row["sigma"], row["sigma_err"] = s, s / math.sqrt(2 * (res.size - 1))
    else:
        row["sigma"] = row["sigma_err"] = float("nan")
    return row


def shear_bin_rows(g_true, g_est, failed, pair_ids, cal, edges, name) -> list[dict]:
    """Per component and true-shear bin: response m, mean calibrated residual and sigma, with the
    global calibration ``cal``; m and the residual from pair means when ``pair_ids`` has pairs (a
    local slope in a bin 0.025 wide would be hopelessly noisy: m_bin = m + <residual> / <g_true>)."""
    g_true = np.asarray(g_true, dtype=np.float64)
    g_est = np.asarray(g_est, dtype=np.float64)
    ok = valid_rows(g_true, g_est, failed)
    paired = pair_ids is not None and len(np.unique(pair_ids)) < len(pair_ids)
    if paired:
        pt, pe, pbad = average_pairs(g_true, g_est, pair_ids, failed)
    else:
        pt, pe, pbad = g_true, g_est, ~ok
    rows = []
    for k in range(2):
        for b in range(len(edges) - 1):
            row = _shear_bin(g_true, g_est, ok, pt, pe, pbad, k, edges[b], edges[b + 1], b == len(edges) - 2, cal)
            rows.append({"estimator": name, **row})
    return rows
