"""Choose calibration-surface settings on a held-out part of the calibration set.

The surface's settings (basis, degree / knots, stages, features) trade flexibility against noise.
:func:`select_surface` splits the calibration set by ring pair into a fitting part and a held-out
part, fits every candidate on the fitting part, scores it on the held-out part by the residual
conditional bias ``chi2(m = 0) = sum (m / m_err)^2`` over quantile bins of the measured observables
(pair means; both components), and refits the best candidate on the whole calibration set. The test
set is never involved.

A candidate is a dict of :func:`~wlshear.calibration.surface.fit_surface` keyword arguments, e.g.
``{"basis": "poly", "degree": 3, "n_stages": 2, "features": ("mag", "log10_hlr")}``.
"""

from __future__ import annotations

import time

import numpy as np

from wlshear.calibration.surface import fit_surface
from wlshear.metrics.conditional import chi2_zero_m, conditional_rows

__all__ = ["select_surface", "residual_chi2", "default_candidates"]

#: default binning of the held-out score: finer than the 5 x 3 target bins, so the choice is not
#: tuned to one particular set of bin edges
SCORE_BINS = {"mag": 10, "hlr_px": 6}


def default_candidates() -> list[dict]:
    """A small grid: poly degree 2-5 and binned-and-interpolated (linear) surfaces, 1-3 stages,
    with and without S/N as a third feature."""
    out = []
    for feats in (("mag", "log10_hlr"), ("mag", "log10_hlr", "log10_snr")):
        for st in (1, 2, 3):
            for d in (2, 3, 4, 5):
                out.append({"basis": "poly", "degree": d, "n_stages": st, "features": feats})
            for k in ((4, 6, 8) if len(feats) == 2 else (4,)):
                out.append({"basis": "linear", "n_knots": k, "n_stages": st, "features": feats})
    return out


def residual_chi2(g_true, g_est, observables: dict, pair_ids, failed=None, bins=None) -> dict:
    """``chi2(m=0)``, its dof, ``max |m|`` and the RMS error per galaxy for one set of estimates.

    Bins are quantiles of the pair-mean observables (``wlshear.metrics.conditional``)."""
    bins = dict(SCORE_BINS if bins is None else bins)
    rows = conditional_rows(g_true, {"e": (g_est, failed)}, observables, pair_ids, bins)
    g_est = np.asarray(g_est, dtype=np.float64)
    ok = np.all(np.isfinite(g_est), 1) & (np.ones(len(g_est), bool) if failed is None else ~np.asarray(failed, bool))
    return {**chi2_zero_m(rows), "sigma": float(np.sqrt(np.mean((g_est[ok] - np.asarray(g_true)[ok]) ** 2)))}


def _subset(obs: dict, sel) -> dict:
    return {k: np.asarray(v)[sel] for k, v in obs.items()}


def select_surface(g_true, g_est, observables: dict, pair_ids, failed=None, candidates=None,
                   holdout_fraction: float = 0.5, seed: int = 0, bins=None, max_sigma_ratio: float | None = 1.03,
                   verbose: bool = False):
    """Fit each candidate on a random ``1 - holdout_fraction`` of the pairs, score it on the rest,
    refit the best on everything.

    The score is ``chi2(m=0)`` over ``bins`` (default :data:`SCORE_BINS`) on the held-out pairs;
    candidates whose held-out RMS error exceeds ``max_sigma_ratio`` times that of the uncorrected
    estimates are skipped (unless none pass).

    Returns ``(surface fitted on all pairs, best candidate, table)`` where ``table`` lists every
    candidate with its held-out score (sorted best first).
    """
    g_true = np.asarray(g_true, dtype=np.float64)
    g_est = np.asarray(g_est, dtype=np.float64)
    pair_ids = np.asarray(pair_ids)
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    candidates = list(default_candidates() if candidates is None else candidates)
    if not candidates:
        raise ValueError("select_surface needs at least one candidate")
    upairs = np.unique(pair_ids)
    rng = np.random.default_rng(seed)
    held_pairs = rng.random(len(upairs)) < holdout_fraction
    held = np.isin(pair_ids, upairs[held_pairs])
    fit = ~held
    fsel = None if failed is None else np.asarray(failed, bool)
    f_fit = None if fsel is None else fsel[fit]
    f_held = None if fsel is None else fsel[held]
    obs_fit, obs_held = _subset(observables, fit), _subset(observables, held)
    base = residual_chi2(g_true[held], g_est[held], obs_held, pair_ids[held], f_held, bins)
    table = []
    for cand in candidates:
        t0 = time.time()
        try:
            s = fit_surface(g_true[fit], g_est[fit], obs_fit, pair_ids=pair_ids[fit], failed=f_fit, **cand)
            sc = residual_chi2(g_true[held], s.apply(g_est[held], obs_held), obs_held, pair_ids[held], f_held, bins)
        except (ValueError, np.linalg.LinAlgError) as err:
            sc = {"chi2": float("inf"), "dof": 0, "max_abs_m": float("nan"), "sigma": float("nan"), "error": str(err)}
        sc["sigma_ratio"] = sc["sigma"] / base["sigma"] if base["sigma"] > 0 else float("nan")
        row = {"candidate": dict(cand), **sc, "seconds": time.time() - t0}
        table.append(row)
        if verbose:
            print(f"  {cand}: held-out chi2 {sc['chi2']:.1f}/{sc['dof']}, max|m| {sc['max_abs_m']:.4f}, "
                  f"sigma ratio {sc['sigma_ratio']:.4f} ({row['seconds']:.1f} s)", flush=True)
    ok = [r for r in table if np.isfinite(r["chi2"])
          and (max_sigma_ratio is None or r["sigma_ratio"] <= max_sigma_ratio)]
    pool = ok or [r for r in table if np.isfinite(r["chi2"])]
    if not pool:
        raise ValueError("every surface candidate failed to fit; see the table's 'error' entries")
    best = min(pool, key=lambda r: r["chi2"])
    surf = fit_surface(g_true, g_est, observables, pair_ids=pair_ids, failed=failed, **best["candidate"])
    surf.diagnostics.update(selection={"holdout_fraction": holdout_fraction, "seed": seed,
                                       "bins": dict(SCORE_BINS if bins is None else bins),
                                       "n_candidates": len(table), "heldout_uncorrected": base,
                                       "heldout_best": {k: best[k] for k in ("chi2", "dof", "max_abs_m", "sigma_ratio")}})
    table.sort(key=lambda r: r["chi2"])
    return surf, best["candidate"], table
