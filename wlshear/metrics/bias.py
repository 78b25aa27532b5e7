"""Multiplicative / additive shear bias fits and calibration.

Bias model per component (``docs/CONVENTIONS.md``): g_est = (1 + m) g_true + c, fitted by ordinary
least squares of g_est on g_true. Calibrated estimate: (g_est - c) / (1 + m); its RMS deviation
from g_true is ``sigma``, the per-galaxy shear error used to compare estimators.

Failed rows (the estimator's ``failed`` flag, or a non-finite value in either component of
g_est or g_true) are excluded from the fit of *both* components and counted in ``n_failed``.

Ring pairs: a simulation may draw each galaxy twice with the same shear, the second copy rotated
by 90 degrees, which flips the sign of its intrinsic ellipticity. Averaging the two estimates
cancels the intrinsic shape to first order, so m and c are measured with much less shape noise
(``pair_ids`` / :func:`average_pairs`). The fit is then over pairs: ``n`` counts pairs (a pair
with any failed member counts as one failed pair) and ``sigma`` is the RMS of the pair means,
which is *not* the per-galaxy error; fit unpaired data for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BiasFit", "fit_bias", "fit_line", "fit_slope", "calibrate", "average_pairs", "valid_rows", "bias_summary",
           "pair_bootstrap_sigma"]


@dataclass
class BiasFit:
    """Result of :func:`fit_bias`. Arrays hold (component 1, component 2)."""

    m: np.ndarray
    m_err: np.ndarray
    c: np.ndarray
    c_err: np.ndarray
    sigma: np.ndarray
    sigma_err: np.ndarray
    n: int
    n_failed: int
    bootstrap: int = 0
    paired: bool = False

    def as_dict(self) -> dict:
        """Flat dict: m1, m1_err, m2, ..., sigma2_err, n, n_failed (for tables / CSV / logs)."""
        out = {}
        for key in ("m", "m_err", "c", "c_err", "sigma", "sigma_err"):
            val = np.asarray(getattr(self, key))
            base, _, suffix = key.partition("_")
            for i in range(2):
                out[f"{base}{i + 1}{'_' + suffix if suffix else ''}"] = float(val[i])
        out["n"] = int(self.n)
        out["n_failed"] = int(self.n_failed)
        return out

    def calibration(self) -> dict:
        """The fitted bias as a calibration ``{m1, c1, m2, c2}`` (what ``ShearEstimator`` inverts)."""
        return {"m1": float(self.m[0]), "c1": float(self.c[0]), "m2": float(self.m[1]), "c2": float(self.c[1])}

    def __str__(self) -> str:
        d = self.as_dict()
        return (
            f"m1={d['m1']:+.4f}+-{d['m1_err']:.4f} m2={d['m2']:+.4f}+-{d['m2_err']:.4f} "
            f"c1={d['c1']:+.5f}+-{d['c1_err']:.5f} c2={d['c2']:+.5f}+-{d['c2_err']:.5f} "
            f"sigma1={d['sigma1']:.4f} sigma2={d['sigma2']:.4f} n={self.n} failed={self.n_failed}"
        )


def _as_g(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) holding (g1, g2); got {arr.shape}")
    return arr


def valid_rows(g_true, g_est, failed=None) -> np.ndarray:
    """Boolean ``(N,)`` mask of rows usable in a fit: not flagged failed, all values finite."""
    g_true = _as_g(g_true, "g_true")
    g_est = _as_g(g_est, "g_est")
    if g_true.shape != g_est.shape:
        raise ValueError(f"g_true {g_true.shape} and g_est {g_est.shape} must have the same shape")
    ok = np.all(np.isfinite(g_true), axis=1) & np.all(np.isfinite(g_est), axis=1)
    if failed is not None:
        failed = np.asarray(failed, dtype=bool)
        if failed.shape != (len(g_true),):
            raise ValueError(f"failed must have shape ({len(g_true)},), got {failed.shape}")
        ok &= ~failed
    return ok


def fit_line(x, y):
    """OLS fit y = a + b x with standard errors from the residual scatter.

    Returns (b, b_err, a, a_err); NaNs when fewer than 3 points or x has no spread.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    if n < 3:
        return np.nan, np.nan, np.nan, np.nan
    xm, ym = x.mean(), y.mean()
    sxx = np.sum((x - xm) ** 2)
    if sxx <= 0:
        return np.nan, np.nan, np.nan, np.nan
    b = np.sum((x - xm) * (y - ym)) / sxx
    a = ym - b * xm
    s2 = np.sum((y - a - b * x) ** 2) / (n - 2)
    b_err = np.sqrt(s2 / sxx)
    a_err = np.sqrt(s2 * (1.0 / n + xm**2 / sxx))
    return b, b_err, a, a_err


def fit_slope(x, y):
    """OLS fit y = b x through the origin (no intercept) with the standard error of b.

    Returns (b, b_err); NaNs when fewer than 2 points or x is all zero.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sxx = float(np.sum(x**2))
    if x.size < 2 or sxx <= 0:
        return np.nan, np.nan
    b = float(np.sum(x * y)) / sxx
    s2 = np.sum((y - b * x) ** 2) / (x.size - 1)
    return b, float(np.sqrt(s2 / sxx))


def calibrate(g_est, m, c):
    """Calibrated estimate (g_est - c) / (1 + m); m, c scalars or per-component (2,) arrays."""
    g_est = np.asarray(g_est, dtype=np.float64)
    return (g_est - np.asarray(c, dtype=np.float64)) / (1.0 + np.asarray(m, dtype=np.float64))


def average_pairs(g_true, g_est, pair_ids, failed=None, atol: float = 1e-6):
    """Average the estimates of each ring pair (rows sharing a ``pair_ids`` value).

    Parameters
    ----------
    g_true, g_est : ``(N, 2)``; members of a pair must share g_true (checked to ``atol``).
    pair_ids : ``(N,)`` integer-like ids; groups may have any size (pairs, or rings of 4).
    failed : optional ``(N,)`` bool failure flags.

    Returns
    -------
    g_true_pair, g_est_pair : ``(P, 2)`` per-group means (NaN for groups with a failed member).
    failed_pair : ``(P,)`` bool, True where any member failed.
    """
    g_true = _as_g(g_true, "g_true")
    g_est = _as_g(g_est, "g_est")
    ok = valid_rows(g_true, g_est, failed)
    pair_ids = np.asarray(pair_ids)
    if pair_ids.shape != (len(g_true),):
        raise ValueError(f"pair_ids must have shape ({len(g_true)},), got {pair_ids.shape}")
    _, inv, counts = np.unique(pair_ids, return_inverse=True, return_counts=True)
    p = counts.size
    bad = np.bincount(inv, weights=(~ok).astype(float), minlength=p) > 0
    gt = np.where(np.isfinite(g_true), g_true, 0.0)
    ge = np.where(ok[:, None], g_est, 0.0)
    gt_mean = np.stack([np.bincount(inv, weights=gt[:, k], minlength=p) for k in range(2)], 1)
    ge_mean = np.stack([np.bincount(inv, weights=ge[:, k], minlength=p) for k in range(2)], 1)
    gt_mean /= counts[:, None]
    ge_mean /= counts[:, None]
    spread = np.abs(gt - gt_mean[inv])
    if np.any(spread[ok] > atol):
        raise ValueError(
            "ring-pair members must share the same true shear; found pairs whose g_true differ "
            f"by up to {spread[ok].max():.3g}. Check pair_ids."
        )
    gt_mean[bad] = np.nan
    ge_mean[bad] = np.nan
    return gt_mean, ge_mean, bad


def _fit_components(gt, ge, through_origin: bool = False):
    m = np.full(2, np.nan)
    m_err = np.full(2, np.nan)
    c = np.full(2, np.nan)
    c_err = np.full(2, np.nan)
    sigma = np.full(2, np.nan)
    for k in range(2):
        if through_origin:
            (b, b_err), a, a_err = fit_slope(gt[:, k], ge[:, k]), 0.0, 0.0
        else:
            b, b_err, a, a_err = fit_line(gt[:, k], ge[:, k])
        m[k], m_err[k], c[k], c_err[k] = b - 1.0, b_err, a, a_err
        if np.isfinite(b) and b != 0:
            sigma[k] = np.sqrt(np.mean(((ge[:, k] - a) / b - gt[:, k]) ** 2))
    return m, m_err, c, c_err, sigma


def fit_bias(g_true, g_est, failed=None, pair_ids=None, bootstrap: int = 0, rng=None,
             through_origin: bool = False) -> BiasFit:
    """Fit g_est = (1 + m) g_true + c per component (``through_origin``: c fixed at 0, for an
    estimator whose additive term vanishes by symmetry).

    Parameters
    ----------
    g_true, g_est : ``(N, 2)`` arrays of (g1, g2).
    failed : optional ``(N,)`` bool; these rows (and rows with non-finite values) are excluded and
        counted in ``n_failed``.
    pair_ids : optional ``(N,)`` ring-pair ids; pairs are averaged first (see module docstring).
    bootstrap : number of bootstrap resamples (of rows, or of pairs). If > 0, ``m_err``, ``c_err``
        and ``sigma_err`` are bootstrap standard deviations; otherwise m_err, c_err are the OLS
        standard errors from the residual scatter and
        sigma_err = sigma * sqrt(1 / (2 (n - 1)) + (m_err / (1 + m))^2): the sampling error of an
        RMS of Gaussian residuals plus the response uncertainty, which rescales the calibrated
        residuals.
    rng : seed or ``numpy.random.Generator`` for the bootstrap.

    Returns
    -------
    :class:`BiasFit` with per-component arrays m, m_err, c, c_err, sigma, sigma_err and the counts
    n (rows or pairs used) and n_failed.
    """
    g_true = _as_g(g_true, "g_true")
    g_est = _as_g(g_est, "g_est")
    paired = pair_ids is not None
    if paired:
        g_true, g_est, bad = average_pairs(g_true, g_est, pair_ids, failed)
        ok = ~bad
    else:
        ok = valid_rows(g_true, g_est, failed)
    gt, ge = g_true[ok], g_est[ok]
    n = int(ok.sum())
    m, m_err, c, c_err, sigma = _fit_components(gt, ge, through_origin)
    # sampling error of an RMS (Gaussian residuals) plus the propagated response error: the
    # calibrated residuals scale as 1 / (1 + m)
    sigma_err = sigma * np.sqrt(1.0 / (2.0 * max(n - 1, 1)) + (m_err / (1.0 + m)) ** 2)
    if bootstrap and n > 2:
        gen = np.random.default_rng(rng)
        samples = np.empty((bootstrap, 3, 2))
        for b in range(bootstrap):
            idx = gen.integers(0, n, n)
            bm, _, bc, _, bs = _fit_components(gt[idx], ge[idx], through_origin)
            samples[b] = (bm, bc, bs)
        std = np.nanstd(samples, axis=0, ddof=1)
        m_err, c_err, sigma_err = std[0], std[1], std[2]
    return BiasFit(m=m, m_err=m_err, c=c, c_err=c_err, sigma=sigma, sigma_err=sigma_err, n=n,
                   n_failed=int((~ok).sum()), bootstrap=int(bootstrap), paired=paired)


def pair_bootstrap_sigma(g_true, g_est, failed=None, groups=None, n_boot: int = 200, rng=None):
    """Bootstrap standard deviation of sigma (per component) resampling whole groups (ring pairs).

    Each resample refits m, c and recomputes the RMS of the calibrated residuals (unpaired), using
    multiplicity weights so that it is vectorised over rows. Returns a (2,) array (NaN if < 3 rows).
    """
    g_true = np.asarray(g_true, dtype=np.float64)
    g_est = np.asarray(g_est, dtype=np.float64)
    ok = valid_rows(g_true, g_est, failed)
    if ok.sum() < 3 or n_boot < 2:
        return np.full(2, np.nan)
    gt, ge = g_true[ok], g_est[ok]
    grp = np.arange(len(g_true))[ok] if groups is None else np.asarray(groups)[ok]
    _, inv = np.unique(grp, return_inverse=True)
    n_groups = int(inv.max()) + 1
    gen = np.random.default_rng(rng)
    samples = np.empty((n_boot, 2))
    for b in range(n_boot):
        w = np.bincount(gen.integers(0, n_groups, n_groups), minlength=n_groups)[inv].astype(np.float64)
        sw = w.sum()
        for k in range(2):
            x, y = gt[:, k], ge[:, k]
            xm, ym = (w * x).sum() / sw, (w * y).sum() / sw
            sxx = (w * (x - xm) ** 2).sum()
            slope = (w * (x - xm) * (y - ym)).sum() / sxx if sxx > 0 else np.nan
            a = ym - slope * xm
            samples[b, k] = np.sqrt((w * ((y - a) / slope - x) ** 2).sum() / sw)
    return np.nanstd(samples, axis=0, ddof=1)


def bias_summary(g_true, g_est, failed=None, pair_ids=None, bootstrap: int = 0, rng=None) -> dict:
    """m, c (pair-averaged fit when ``pair_ids`` has pairs) and per-galaxy sigma with errors.

    Keys: m1, m1_err, ..., c2_err (from the paired fit if paired), sigma1, sigma1_err, sigma2,
    sigma2_err (unpaired fit; bootstrap over pairs when ``bootstrap`` > 0), n (stamps used),
    n_failed (stamps), n_pairs, paired, m1_unpaired, m2_unpaired (for reference).
    """
    gen = np.random.default_rng(rng)
    paired = pair_ids is not None and len(np.unique(pair_ids)) < len(pair_ids)
    per = fit_bias(g_true, g_est, failed=failed)
    out = per.as_dict()
    out["m1_unpaired"], out["m2_unpaired"] = float(per.m[0]), float(per.m[1])
    out["paired"] = bool(paired)
    out["n_pairs"] = 0
    if paired:
        pf = fit_bias(g_true, g_est, failed=failed, pair_ids=pair_ids, bootstrap=bootstrap, rng=gen)
        d = pf.as_dict()
        for k in ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err"):
            out[k] = d[k]
        out["n_pairs"] = int(pf.n)
    elif bootstrap:
        bf = fit_bias(g_true, g_est, failed=failed, bootstrap=bootstrap, rng=gen)
        for k in ("m1_err", "m2_err", "c1_err", "c2_err"):
            out[k] = bf.as_dict()[k]
    if bootstrap:
        se = pair_bootstrap_sigma(g_true, g_est, failed, pair_ids if paired else None, bootstrap, gen)
        out["sigma1_err"], out["sigma2_err"] = float(se[0]), float(se[1])
    out["bootstrap"] = int(bootstrap)
    return out


def fixed_sigma(g_true, g_est, failed, cal) -> dict:
    """``sigma{k}_fixed`` (and ``_err``): RMS of ``(g_est - c) / (1 + m) - g_true`` per galaxy with a
    given calibration ``cal`` = {m1, c1, m2, c2} (e.g. the whole test set's: what a survey applying
    a fixed calibration sees); NaN without a calibration or usable rows."""
    out = {}
    ok = valid_rows(g_true, g_est, failed)
    n = int(ok.sum())
    for k in (1, 2):
        if cal is None or n == 0 or not np.isfinite(cal.get(f"m{k}", np.nan)):
            out[f"sigma{k}_fixed"] = out[f"sigma{k}_fixed_err"] = float("nan")
            continue
        r = (g_est[ok, k - 1] - cal[f"c{k}"]) / (1 + cal[f"m{k}"]) - g_true[ok, k - 1]
        s = float(np.sqrt(np.mean(r**2)))
        out[f"sigma{k}_fixed"] = s
        out[f"sigma{k}_fixed_err"] = s / math.sqrt(2 * max(n - 1, 1))
    return out
