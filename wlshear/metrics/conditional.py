"""Conditional shear bias: m, c and sigma in bins of observables measured on the stamps.

The observables (aperture magnitude ``mag``, half-light radius ``hlr_px`` [pixels], ``snr``) come
from :func:`wlshear.observables.measure_observables` on the very stamps the estimators
saw, never from the simulation truth, so the same binning can be applied to real data. With ring
pairs each pair is placed in the bin of its members' *mean* observable, so both members always
share a bin and m, c come from the pair-averaged fit (shape noise cancelled).

Per (estimator, observable, bin) a row holds: bin edges and mean, ``n`` stamps, ``n_pairs``,
``n_failed``, m1, m1_err, m2, m2_err, c1, c1_err, c2, c2_err (pair fit when paired), ``sigma1``,
``sigma2`` (RMS of the per-bin-recalibrated estimate per galaxy, unpaired), ``sigma1_fixed``,
``sigma2_fixed`` (with a fixed, e.g. whole-set, calibration when given) and their errors.
Galaxies whose observable could not be measured (e.g. flux <= 0 -> NaN magnitude) fall in no bin
and are counted in ``n_unmeasured``.
"""

from __future__ import annotations

import numpy as np

from wlshear.metrics.bias import bias_summary, fixed_sigma
from wlshear.metrics.binned import bin_edges, bin_index

__all__ = ["pair_mean_observable", "conditional_rows", "chi2_zero_m", "DEFAULT_BINS"]

DEFAULT_BINS = {"mag": 5, "hlr_px": 3, "snr": 3}


def pair_mean_observable(x, pair_ids=None) -> np.ndarray:
    """``x`` (N,) replaced by the NaN-aware mean over each ring pair (unchanged without pairs)."""
    x = np.asarray(x, dtype=np.float64)
    if pair_ids is None:
        return x
    _, inv = np.unique(np.asarray(pair_ids), return_inverse=True)
    ok = np.isfinite(x)
    s = np.bincount(inv, weights=np.where(ok, x, 0.0))
    n = np.bincount(inv, weights=ok.astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    return m[inv]


def _one_bin(g_true, g_est, failed, pair_ids, cal) -> dict:
    d = bias_summary(g_true, g_est, failed, pair_ids)
    out = {k: d[k] for k in ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err",
                             "sigma1", "sigma1_err", "sigma2", "sigma2_err", "n_failed", "n_pairs")}
    out.update(fixed_sigma(g_true, g_est, failed, cal))
    return out


def conditional_rows(g_true, estimates: dict, observables: dict, pair_ids=None, bins=None,
                     calibrations: dict | None = None) -> list[dict]:
    """Per-bin bias of every estimator in bins of each observable.

    Parameters
    ----------
    g_true : ``(N, 2)`` true shears.
    estimates : name -> ``(g (N, 2), failed (N,))``.
    observables : dict of ``(N,)`` arrays (``measure_observables`` output).
    pair_ids : ring-pair ids (bin by pair mean; pair-averaged m, c).
    bins : observable -> number of equal-count (quantile) bins or explicit edges;
        default :data:`DEFAULT_BINS`. Quantile edges are computed once per observable (over the
        pair means), so every estimator uses the same bins.
    calibrations : name -> {m1, c1, m2, c2} for ``sigma_fixed`` (e.g. the whole-set fit).
    """
    g_true = np.asarray(g_true, dtype=np.float64)
    bins = dict(DEFAULT_BINS if bins is None else bins)
    rows = []
    for key, nb in bins.items():
        if key not in observables:
            raise ValueError(f"conditional bins: unknown observable {key!r}; measured: {sorted(observables)}")
        x = pair_mean_observable(observables[key], pair_ids)
        finite = np.isfinite(x)
        edges = bin_edges(x[finite], nb if np.ndim(nb) == 0 else list(nb))
        idx = bin_index(x, edges)
        for name, (g, failed) in estimates.items():
            g = np.asarray(g, dtype=np.float64)
            failed = np.zeros(len(g), bool) if failed is None else np.asarray(failed, bool)
            cal = (calibrations or {}).get(name)
            for b in range(len(edges) - 1):
                sel = idx == b
                row = {"estimator": name, "observable": key, "bin": b, "lo": float(edges[b]),
                       "hi": float(edges[b + 1]), "x_mean": float(np.mean(x[sel])) if sel.any() else float("nan"),
                       "n": int(sel.sum()), "n_unmeasured": int((~finite).sum())}
                if sel.sum() >= 3:
                    row.update(_one_bin(g_true[sel], g[sel], failed[sel],
                                        None if pair_ids is None else np.asarray(pair_ids)[sel], cal))
                rows.append(row)
    return rows


def chi2_zero_m(rows: list[dict]) -> dict:
    """The residual conditional bias of :func:`conditional_rows` rows (one estimator; any bins):
    ``chi2`` = sum over bins and both components of (m / m_err)^2 (the test of m = 0), its ``dof``
    and ``max_abs_m``. Bins too small to fit (no ``m1``) are left out."""
    vals = [(r[f"m{k}"], r[f"m{k}_err"]) for r in rows if "m1" in r for k in (1, 2)]
    return {"chi2": float(sum((m / e) ** 2 for m, e in vals)), "dof": len(vals),
            "max_abs_m": float(max(abs(m) for m, _ in vals))}
