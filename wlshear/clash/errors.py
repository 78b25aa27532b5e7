"""Per-galaxy shear errors on real data and the errors-in-both-variables calibration fit.

Hold-out per-galaxy error (CLASH analysis). Split the galaxies 50/50 at random (seeded). From
the *training* half build the smoothed map and its bootstrap resamples, evaluated exactly at the
held-out galaxies' positions (:func:`wlshear.clash.maps.smooth_at` / ``bootstrap_at``). Per
shear component,

    sigma_field-source^2 = mean over held-out i of (g_i - map(x_i))^2
    sigma_field^2        = mean over held-out i of Var_bootstrap[map(x_i)]
    sigma_source^2       = sigma_field-source^2 - sigma_field^2

``sigma_source`` is the per-galaxy error (shape noise + measurement noise). A negative
difference (possible for tiny samples) gives NaN and ``negative = True`` for that component.

Relative calibration. Straight line y = (1 + m) x + c with Gaussian errors in x and y (and their
covariance) per point, following Hogg, Bovy & Lang 2010 (arXiv:1008.4686) section 7: with the
line direction at angle theta, the unit normal v = (-sin theta, cos theta), the orthogonal
displacement Delta_i = v . Z_i - b cos theta and the projected variance
Sigma_i^2 = v^T S_i v, the log-likelihood is ln L = -sum_i Delta_i^2 / (2 Sigma_i^2)
(their eq. 32). In slope/intercept form this is the "effective variance" chi^2
sum (y_i - a x_i - c)^2 / (a^2 sx_i^2 - 2 a sxy_i + sy_i^2), a = 1 + m. It is maximised with
scipy.optimize; errors come from the inverse Hessian of -ln L in (m, c) (or from a bootstrap).
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

from wlshear.sim.constants import PIXEL_SCALE
from .maps import bootstrap_at, smooth_at


def holdout_sigma_source(
    x,
    y,
    g,
    scale_arcsec: float = 19.5,
    n_boot: int = 100,
    holdout_fraction: float = 0.5,
    rng=None,
    pixel_scale: float = PIXEL_SCALE,
) -> dict:
    """Per-galaxy statistical error from a hold-out split (module docstring).

    Parameters
    ----------
    x, y : (N,) galaxy positions in image pixels.
    g : (N, 2) shear estimates (g1, g2) (or (N, k)).
    scale_arcsec : map kernel sigma (19.5").
    n_boot : bootstrap resamples of the training-half map.
    holdout_fraction : fraction held out (0.5).
    rng : seed or Generator for the split and the bootstrap.

    Returns
    -------
    dict with per-component arrays ``sigma_source``, ``sigma_field_source``, ``sigma_field``,
    bool ``negative`` (sigma_source^2 < 0 -> NaN), and ``n_train``, ``n_test`` and the
    boolean ``test_mask`` (True = held out).
    """
    rng = np.random.default_rng(rng)
    g = np.asarray(g, dtype=np.float64)
    if g.ndim == 1:
        g = g[:, None]
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = g.shape[0]
    if x.shape != (n,) or y.shape != (n,):
        raise ValueError(f"holdout_sigma_source: x {x.shape}, y {y.shape} must be ({n},) like g")
    good = np.isfinite(x) & np.isfinite(y) & np.isfinite(g).all(axis=1)
    idx = np.flatnonzero(good)
    if idx.size < 10:
        raise ValueError(f"holdout_sigma_source: need >= 10 finite galaxies, got {idx.size}")
    perm = rng.permutation(idx)
    n_test = int(round(holdout_fraction * idx.size))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    pred = smooth_at(x[train], y[train], g[train], x[test], y[test], scale_arcsec, pixel_scale)
    boots = bootstrap_at(x[train], y[train], g[train], x[test], y[test], scale_arcsec, n_boot, rng, pixel_scale=pixel_scale)
    var_field = np.nanvar(boots, axis=0, ddof=1)  # (M, k)
    resid = g[test] - pred
    ok = np.isfinite(resid).all(axis=1) & np.isfinite(var_field).all(axis=1)
    sfs2 = np.mean(resid[ok] ** 2, axis=0)
    sf2 = np.mean(var_field[ok], axis=0)
    ss2 = sfs2 - sf2
    negative = ss2 < 0
    test_mask = np.zeros(n, dtype=bool)
    test_mask[test] = True
    return {
        "sigma_source": np.where(negative, np.nan, np.sqrt(np.abs(ss2))),
        "sigma_field_source": np.sqrt(sfs2),
        "sigma_field": np.sqrt(sf2),
        "negative": negative,
        "n_train": int(train.size),
        "n_test": int(ok.sum()),
        "test_mask": test_mask,
    }


def _neg_loglike(params, x, y, sxx, syy, sxy):
    a, c = 1.0 + params[0], params[1]
    var = a * a * sxx - 2 * a * sxy + syy
    return 0.5 * np.sum((y - a * x - c) ** 2 / var)


def _hessian(f, p, steps):
    p = np.asarray(p, dtype=np.float64)
    n = p.size
    h = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            ei = np.zeros(n)
            ej = np.zeros(n)
            ei[i] = steps[i]
            ej[j] = steps[j]
            h[i, j] = h[j, i] = (f(p + ei + ej) - f(p + ei - ej) - f(p - ei + ej) + f(p - ei - ej)) / (4 * steps[i] * steps[j])
    return h


def fit_line_xy_errors(x, y, sigma_x, sigma_y, cov_xy=None, n_boot: int = 0, rng=None) -> dict:
    """Fit y = (1 + m) x + c with errors in both variables (Hogg et al. 2010, section 7).

    Parameters
    ----------
    x, y : (N,) data (e.g. baseline map and CNN map sampled at the same positions).
    sigma_x, sigma_y : (N,) or scalar 1-sigma errors; cov_xy : (N,) or scalar covariance of the
        x and y errors (e.g. from :func:`wlshear.clash.maps.bootstrap_covariance`), default 0.
    n_boot : if > 0 also bootstrap the points and report ``m_err_boot``, ``c_err_boot``.

    Returns
    -------
    dict with ``m``, ``c``, ``m_err``, ``c_err``, ``cov`` (2x2 inverse Hessian in (m, c)),
    ``chi2`` (= -2 ln L), ``ndof``, ``success`` (optimiser status) [, bootstrap errors].
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    n = x.size
    sxx = np.broadcast_to(np.asarray(sigma_x, dtype=np.float64) ** 2, (n,)).copy()
    syy = np.broadcast_to(np.asarray(sigma_y, dtype=np.float64) ** 2, (n,)).copy()
    sxy = np.zeros(n) if cov_xy is None else np.broadcast_to(np.asarray(cov_xy, dtype=np.float64), (n,)).copy()
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(sxx) & np.isfinite(syy) & np.isfinite(sxy) & (sxx + syy > 0)
    if ok.sum() < 3:
        raise ValueError(f"fit_line_xy_errors: need >= 3 finite points with positive errors, got {ok.sum()}")
    x, y, sxx, syy, sxy = x[ok], y[ok], sxx[ok], syy[ok], sxy[ok]

    def solve(xx, yy, vx, vy, vxy):
        # start from ordinary least squares; the effective variance is positive for any slope
        # as long as each point's covariance matrix is positive semi-definite
        a0, c0 = np.polyfit(xx, yy, 1) if np.ptp(xx) > 0 else (1.0, 0.0)
        res = optimize.minimize(
            _neg_loglike, x0=[a0 - 1.0, c0], args=(xx, yy, vx, vy, vxy), method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000},
        )
        res2 = optimize.minimize(_neg_loglike, x0=res.x, args=(xx, yy, vx, vy, vxy), method="BFGS")
        return (res2 if res2.fun <= res.fun else res), res.success or res2.success

    res, success = solve(x, y, sxx, syy, sxy)
    f = lambda p: _neg_loglike(p, x, y, sxx, syy, sxy)  # noqa: E731
    scale = np.sqrt(np.mean(sxx + syy))
    steps = [1e-3 * max(scale / max(np.std(x), 1e-12), 1e-6), 1e-3 * max(scale, 1e-12)]
    hess = _hessian(f, res.x, steps)
    try:
        cov = np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        cov = np.full((2, 2), np.nan)
    out = {
        "m": float(res.x[0]),
        "c": float(res.x[1]),
        "m_err": float(np.sqrt(cov[0, 0])) if cov[0, 0] > 0 else np.nan,
        "c_err": float(np.sqrt(cov[1, 1])) if cov[1, 1] > 0 else np.nan,
        "cov": cov,
        "chi2": float(2 * res.fun),
        "ndof": int(x.size - 2),
        "success": bool(success),
        "n": int(x.size),
    }
    if n_boot > 0:
        rng = np.random.default_rng(rng)
        bs = []
        for _ in range(n_boot):
            i = rng.integers(0, x.size, x.size)
            r, _ = solve(x[i], y[i], sxx[i], syy[i], sxy[i])
            bs.append(r.x)
        bs = np.array(bs)
        out["m_err_boot"] = float(np.std(bs[:, 0], ddof=1))
        out["c_err_boot"] = float(np.std(bs[:, 1], ddof=1))
    return out


def subsample_positions(n_sources: int, fraction: float = 0.1, rng=None) -> np.ndarray:
    """Random indices of ``fraction * n_sources`` galaxies: the positions at which both maps are
    sampled for the calibration fit (1/10 of the source density, to limit correlated points)."""
    rng = np.random.default_rng(rng)
    k = max(3, int(round(fraction * n_sources)))
    return np.sort(rng.choice(n_sources, size=min(k, n_sources), replace=False))


def relative_calibration(ref, est, var_ref, var_est, cov=None, n_boot: int = 0, rng=None) -> list[dict]:
    """Per-component fit est = (1 + m) ref + c of two shear maps sampled at the same points.

    ``ref``, ``est`` : (M, 2) sampled map values (baseline, CNN); ``var_ref``, ``var_est``,
    ``cov`` : (M, 2) bootstrap variances / covariance at those points. Returns one
    :func:`fit_line_xy_errors` dict per component.
    """
    ref = np.asarray(ref, dtype=np.float64)
    est = np.asarray(est, dtype=np.float64)
    if ref.ndim == 1:
        ref, est = ref[:, None], est[:, None]
    var_ref = np.asarray(var_ref, dtype=np.float64).reshape(ref.shape)
    var_est = np.asarray(var_est, dtype=np.float64).reshape(ref.shape)
    cov = np.zeros_like(ref) if cov is None else np.asarray(cov, dtype=np.float64).reshape(ref.shape)
    return [
        fit_line_xy_errors(ref[:, k], est[:, k], np.sqrt(var_ref[:, k]), np.sqrt(var_est[:, k]), cov[:, k], n_boot, rng)
        for k in range(ref.shape[1])
    ]



def pooled_relative_calibration(points: list[dict], n_boot: int = 200, rng=None, n_boot_points: int = 0) -> list[dict]:
    """The relative calibration pooled over clusters, with errors from resampling whole clusters.

    ``points``: one dict per cluster with (M_k, 2) arrays ``ref``, ``est``, ``var_ref``,
    ``var_est``, ``cov`` (as for :func:`relative_calibration`). The fit is
    :func:`relative_calibration` on all points together; its inverse-Hessian ``m_err`` treats the
    points as independent, but the points of one cluster are smoothed from the same few galaxies
    (a 19.5" kernel spans a good part of a field), so it is too small. ``m_err_clusters`` and
    ``c_err_clusters`` are the standard deviations of the same fit over ``n_boot`` resamples of
    the clusters with replacement (needs >= 3 clusters and ``n_boot`` > 1; otherwise absent), and
    ``n_clusters`` the number of clusters that contributed points. ``n_boot_points`` > 0 adds the
    point bootstrap of :func:`fit_line_xy_errors` (``m_err_boot``) to the pooled fit."""
    keys = ("ref", "est", "var_ref", "var_est", "cov")
    pts = [p for p in points if p is not None and len(np.asarray(p["ref"])) > 0]
    if not pts:
        raise ValueError("pooled_relative_calibration: no cluster has calibration points")
    cat = {k: np.concatenate([np.asarray(p[k], dtype=np.float64) for p in pts]) for k in keys}
    rng = np.random.default_rng(rng)
    fits_ = relative_calibration(cat["ref"], cat["est"], cat["var_ref"], cat["var_est"], cat["cov"], n_boot_points, rng)
    for f in fits_:
        f["n_clusters"] = len(pts)
    if len(pts) >= 3 and n_boot > 1:
        draws = []
        for _ in range(int(n_boot)):
            pick = rng.integers(0, len(pts), len(pts))
            b = {k: np.concatenate([np.asarray(pts[i][k], dtype=np.float64) for i in pick]) for k in keys}
            try:
                fb = relative_calibration(b["ref"], b["est"], b["var_ref"], b["var_est"], b["cov"])
            except ValueError:  # a resample with < 3 usable points
                continue
            draws.append([[f["m"], f["c"]] for f in fb])
        if len(draws) > 1:
            d = np.array(draws)  # (n, k, 2)
            for j, f in enumerate(fits_):
                f["m_err_clusters"] = float(np.std(d[:, j, 0], ddof=1))
                f["c_err_clusters"] = float(np.std(d[:, j, 1], ddof=1))
    return fits_


def pooled_sigma_source(holdouts: list[dict]) -> dict | None:
    """The per-galaxy error pooled over clusters from their hold-out summaries
    (``{"sigma_source": [s1, s2], "n_test": n}`` each): per component
    ``sigma^2 = sum_k n_k sigma_k^2 / sum_k n_k`` (every held-out galaxy counts once), and its error
    from the scatter of the clusters' ``sigma_k`` about it (``sqrt(sum w_k^2 (sigma_k - sigma)^2)``
    with ``w_k = n_k / sum n``; NaN for one cluster). Clusters with a NaN component (negative
    sigma_source^2) are left out of that component and counted. None when no cluster has one."""
    rows = [h for h in holdouts if h and "sigma_source" in h and int(h.get("n_test", 0)) > 0]
    if not rows:
        return None
    s = np.array([np.asarray(h["sigma_source"], dtype=np.float64) for h in rows])  # (K, 2)
    n = np.array([float(h["n_test"]) for h in rows])
    sigma, err, used = [], [], []
    for j in range(s.shape[1]):
        ok = np.isfinite(s[:, j])
        if not ok.any():
            sigma.append(float("nan")), err.append(float("nan")), used.append(0)
            continue
        w = n[ok] / n[ok].sum()
        sj = float(np.sqrt(np.sum(w * s[ok, j] ** 2)))
        sigma.append(sj)
        err.append(float(np.sqrt(np.sum(w**2 * (s[ok, j] - sj) ** 2))) if ok.sum() > 1 else float("nan"))
        used.append(int(ok.sum()))
    return {"sigma_source": sigma, "sigma_source_err": err, "n_clusters": used, "n_test": int(n.sum())}
