"""Multiplicative and additive shear bias from the +-g common-noise design.

The design (``wlshear.sim.augment.shear_pair_params``): every unit (a galaxy at one orientation
plus its 90-degree ring twin) is drawn under (+g0, 0), (-g0, 0), (0, +g0), (0, -g0), the two
opposite shears sharing one noise realisation. With the ensemble shear ``S = <R>^-1 <g>`` of a
subset (``R`` = identity for estimators calibrated otherwise)::

    m_j = (S_j[component j, +] - S_j[component j, -]) / (2 g0) - 1
    c_j = S_j over all stamps (the true shears average to zero)

``<R>`` is averaged over all stamps of the bin. Errors: bootstrap over units (galaxy x
orientation), so both noise and the galaxy-orientation scatter enter. Binning by a per-unit
quantity known without shear dependence (e.g. the catalogue magnitude) needs no selection response.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pair_bias", "binned_pair_bias", "calibrated_sigma"]


def _unit_sums(g, R, design, keep):
    """Per-unit sums needed by the estimator: (n_units, ...) arrays."""
    units, inv = np.unique(design["unit"][keep], return_inverse=True)
    nu = len(units)
    comp, sign = design["component"][keep], design["sign"][keep]
    gk, Rk = g[keep], R[keep]
    sums = {}
    for j in (0, 1):
        for s, tag in ((1, "p"), (-1, "m")):
            sel = (comp == j) & (sign == s)
            sums[f"g{j}{tag}"] = np.zeros((nu, 2))
            np.add.at(sums[f"g{j}{tag}"], inv[sel], gk[sel])
            sums[f"n{j}{tag}"] = np.bincount(inv[sel], minlength=nu).astype(float)
    sums["g"] = np.zeros((nu, 2))
    np.add.at(sums["g"], inv, gk)
    sums["R"] = np.zeros((nu, 2, 2))
    np.add.at(sums["R"], inv, Rk)
    sums["n"] = np.bincount(inv, minlength=nu).astype(float)
    return sums


def _estimate(sums, w, g0):
    """m (2,), c (2,) from unit sums weighted by bootstrap counts ``w`` (n_units,) or (B, n_units)."""
    w = np.atleast_2d(w)
    R = np.einsum("bu,uij->bij", w, sums["R"]) / (w @ sums["n"])[:, None, None]
    rinv = np.linalg.inv(R)
    m, c = np.empty((len(w), 2)), np.empty((len(w), 2))
    for j in (0, 1):
        sp = np.einsum("bij,bj->bi", rinv, (w @ sums[f"g{j}p"]) / (w @ sums[f"n{j}p"])[:, None])
        sm = np.einsum("bij,bj->bi", rinv, (w @ sums[f"g{j}m"]) / (w @ sums[f"n{j}m"])[:, None])
        m[:, j] = (sp[:, j] - sm[:, j]) / (2 * g0) - 1
    call = np.einsum("bij,bj->bi", rinv, (w @ sums["g"]) / (w @ sums["n"])[:, None])
    c[:] = call
    return m, c, R


def pair_bias(g: np.ndarray, design: dict, shear: float, R: np.ndarray | None = None, mask=None,
              n_boot: int = 300, rng=None) -> dict:
    """m, c per component with bootstrap errors over units; see the module docstring.

    Args:
        g: ``(N, 2)`` estimates (NaN rows = failures, dropped with their whole ±g pair partner).
        design: ``{"unit", "component", "sign"}`` per stamp (from ``shear_pair_params``).
        shear: the design's g0.
        R: ``(N, 2, 2)`` per-galaxy metacal responses, or None (identity).
        mask: optional ``(N,)`` selection (e.g. a magnitude bin by catalogue value).
    Returns a dict with m1, m2, c1, c2, their ``_err``, ``R`` (2x2 mean response), ``n``, ``n_units``,
    ``n_failed``.
    """
    g = np.asarray(g, dtype=float)
    n = len(g)
    R = np.broadcast_to(np.eye(2), (n, 2, 2)) if R is None else np.asarray(R, dtype=float)
    ok = np.isfinite(g).all(axis=1) & np.isfinite(R).all(axis=(1, 2))
    # a failed stamp removes its +-g partner too, so every kept pair is complete
    pair = np.arange(n) // 2
    ok_pair = np.bincount(pair, weights=ok.astype(float), minlength=pair.max() + 1) == 2
    keep = ok_pair[pair]
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool)
    out = {"n": int(keep.sum()), "n_failed": int((~ok).sum())}
    if keep.sum() < 8:
        return {**out, **{k: np.nan for k in ("m1", "m2", "c1", "c2", "m1_err", "m2_err", "c1_err", "c2_err")},
                "n_units": 0}
    sums = _unit_sums(g, R, design, keep)
    nu = len(sums["n"])
    m, c, Rm = _estimate(sums, np.ones(nu), shear)
    rng = np.random.default_rng(rng)
    wb = rng.multinomial(nu, np.full(nu, 1.0 / nu), size=n_boot).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mb, cb, _ = _estimate(sums, wb, shear)
    out.update({"m1": m[0, 0], "m2": m[0, 1], "c1": c[0, 0], "c2": c[0, 1],
                "m1_err": np.nanstd(mb[:, 0]), "m2_err": np.nanstd(mb[:, 1]),
                "c1_err": np.nanstd(cb[:, 0]), "c2_err": np.nanstd(cb[:, 1]),
                "R": Rm[0].tolist(), "n_units": nu})
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in out.items()}


def binned_pair_bias(g, design, shear, values, edges, R=None, n_boot: int = 300, rng=None) -> list[dict]:
    """:func:`pair_bias` per bin of ``values`` (per stamp, constant within a unit)."""
    values = np.asarray(values, dtype=float)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (values >= lo) & (values < hi)
        rows.append({"lo": float(lo), "hi": float(hi),
                     **pair_bias(g, design, shear, R=R, mask=sel, n_boot=n_boot, rng=rng)})
    return rows


def calibrated_sigma(g: np.ndarray, g_true: np.ndarray, R: np.ndarray | None = None, mask=None) -> np.ndarray:
    """Per-galaxy RMS error (2,) of the calibrated shear: ``<R>^-1 g`` with metacal responses, else
    ``(g - c) / (1 + m)`` with the line fitted on these stamps (the usual simulation calibration)."""
    g = np.asarray(g, dtype=float)
    g_true = np.asarray(g_true, dtype=float)
    ok = np.isfinite(g).all(axis=1)
    if mask is not None:
        ok &= np.asarray(mask, dtype=bool)
    if R is not None:
        R = np.asarray(R, dtype=float)
        ok &= np.isfinite(R).all(axis=(1, 2))
        cal = g[ok] @ np.linalg.inv(R[ok].mean(axis=0)).T
    else:
        cal = np.empty((ok.sum(), 2))
        for j in (0, 1):
            slope, icpt = np.polyfit(g_true[ok, j], g[ok, j], 1)
            cal[:, j] = (g[ok, j] - icpt) / slope
    return np.sqrt(np.mean((cal - g_true[ok]) ** 2, axis=0))
