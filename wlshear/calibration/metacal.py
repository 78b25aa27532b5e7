"""Ensemble shear from metacalibration outputs: responses, selection responses, weights.

Inputs are what :meth:`wlshear.models.ShearEstimator.metacal` returns: per-galaxy shears ``g``
``(N, 2)`` measured on the no-shear counterfactual and responses ``R`` ``(N, 2, 2)``,
``R[:, i, j] = d g_i / d g_j``. The shear of an ensemble is ``<R>^-1 <g>`` (weighted means when
``weights`` are given). Cuts or bins on quantities *measured* on the images need the selection
response (Sheldon & Huff 2017)::

    R_S[i, j] = (<g_i>_{S(+d_j)} - <g_i>_{S(-d_j)}) / (2 d)

where ``<g>`` is always measured on the no-shear image and ``S(+-d_j)`` is the selection made with
the quantity measured on the ``+-d_j`` counterfactual images; the total response is ``<R>_S + R_S``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ensemble_response", "ensemble_shear", "selection_response", "binned_shear", "metacal_measure"]


def _weights(n: int, weights) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=float)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, >= 0 and not all zero")
    return w


def _check(g: np.ndarray, R: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    g = np.asarray(g, dtype=float)
    if g.ndim != 2 or g.shape[1] != 2:
        raise ValueError(f"g must be (N, 2), got shape {g.shape}")
    if R is not None:
        R = np.asarray(R, dtype=float)
        if R.shape != (len(g), 2, 2):
            raise ValueError(f"R must be (N, 2, 2) with N = {len(g)}, got shape {R.shape}")
    return g, R


def ensemble_response(R: np.ndarray, weights=None, mask=None) -> np.ndarray:
    """Weighted mean response ``<R>`` (2, 2) over the finite rows (and ``mask``)."""
    R = np.asarray(R, dtype=float)
    if R.ndim != 3 or R.shape[1:] != (2, 2):
        raise ValueError(f"R must be (N, 2, 2), got shape {R.shape}")
    w = _weights(len(R), weights)
    ok = np.isfinite(R).all(axis=(1, 2))
    if mask is not None:
        ok &= np.asarray(mask, dtype=bool)
    if not ok.any():
        raise ValueError("no galaxy with a finite response in the selection")
    return np.einsum("n,nij->ij", w[ok], R[ok]) / w[ok].sum()


def selection_response(
    g: np.ndarray,
    selected_sheared: Sequence[np.ndarray],
    step: float,
    weights=None,
) -> np.ndarray:
    """Selection response ``R_S`` (2, 2).

    Args:
        g: ``(N, 2)`` shears on the no-shear counterfactual.
        selected_sheared: four boolean ``(N,)`` masks: the selection made with the quantity
            measured on the 1p, 1m, 2p and 2m counterfactual images (in that order).
        step: the metacal shear ``d``.
        weights: optional ``(N,)`` weights.
    """
    g, _ = _check(g)
    if len(selected_sheared) != 4:
        raise ValueError("selected_sheared needs four masks: 1p, 1m, 2p, 2m")
    w = _weights(len(g), weights)
    ok = np.isfinite(g).all(axis=1)
    means = []
    for sel in selected_sheared:
        s = np.asarray(sel, dtype=bool) & ok
        if s.shape != (len(g),):
            raise ValueError(f"each selection mask must be ({len(g)},), got {s.shape}")
        if not s.any():
            raise ValueError("a sheared selection is empty; cannot measure the selection response")
        means.append((w[s, None] * g[s]).sum(axis=0) / w[s].sum())
    rs = np.empty((2, 2))
    rs[:, 0] = (means[0] - means[1]) / (2 * step)
    rs[:, 1] = (means[2] - means[3]) / (2 * step)
    return rs


def ensemble_shear(g: np.ndarray, R: np.ndarray, weights=None, mask=None, R_sel: np.ndarray | None = None) -> dict:
    """``<R>^-1 <g>`` over the finite rows selected by ``mask``.

    Returns ``{"shear": (2,), "R": (2, 2) total response used, "n": count, "shear_err": (2,)}``,
    the error from the scatter of ``<R>^-1 g`` (independent galaxies assumed).
    """
    g, R = _check(g, R)
    w = _weights(len(g), weights)
    ok = np.isfinite(g).all(axis=1) & np.isfinite(R).all(axis=(1, 2))
    if mask is not None:
        ok &= np.asarray(mask, dtype=bool)
    n = int(ok.sum())
    if n == 0:
        raise ValueError("no galaxy with finite g and R in the selection")
    r_tot = ensemble_response(R, w, ok)
    if R_sel is not None:
        r_tot = r_tot + np.asarray(R_sel, dtype=float)
    rinv = np.linalg.inv(r_tot)
    ww = w[ok] / w[ok].sum()
    g_mean = ww @ g[ok]
    cal = g[ok] @ rinv.T
    shear = rinv @ g_mean
    var = (ww[:, None] ** 2 * (cal - shear) ** 2).sum(axis=0) if n > 1 else np.full(2, np.nan)
    return {"shear": shear, "R": r_tot, "n": n, "shear_err": np.sqrt(var)}


def binned_shear(g: np.ndarray, R: np.ndarray, values: np.ndarray, edges: Sequence[float], weights=None) -> list[dict]:
    """:func:`ensemble_shear` in bins of ``values`` (a quantity known without shear dependence,
    e.g. a true magnitude in simulations; for measured quantities add :func:`selection_response`)."""
    values = np.asarray(values, dtype=float)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (values >= lo) & (values < hi)
        row = {"lo": float(lo), "hi": float(hi), "n": int(sel.sum())}
        if sel.any():
            row.update(ensemble_shear(g, R, weights, mask=sel))
        out.append(row)
    return out


def metacal_measure(estimate, operator, stamps: np.ndarray, seed: int | None = 0, batch_size: int = 2000,
                    progress: bool = False, noise_groups=None) -> dict[str, np.ndarray]:
    """Metacalibrate any estimator ``estimate(stamps) -> (g (N, 2), failed (N,))`` (the baselines'
    interface) with a :class:`wlshear.sim.metacal.MetacalOperator`.

    Returns ``{"g", "R", "failed"}`` like ``ShearEstimator.metacal``: ``g`` on the no-shear
    counterfactual, ``R`` from the +-d images; a stamp fails if any of its five measurements fails.
    ``noise_groups``: stamps of one group share one fixnoise field (as in ``ShearEstimator.metacal``).
    """
    import torch
    from tqdm.auto import tqdm

    from wlshear.sim.metacal import SHEAR_NAMES

    x = np.asarray(stamps, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"stamps must be (N, H, W), got shape {x.shape}")
    n = len(x)
    names = tuple(SHEAR_NAMES)
    raw = np.full((n, len(names), 2), np.nan)
    failed = ~np.isfinite(x.reshape(n, -1)).all(axis=1)
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else int(seed))
    fields = None
    if noise_groups is not None and operator.adds_noise:
        fields, index = operator.group_noise(noise_groups, n, generator=gen, size=x.shape[-1])
    for s in tqdm(range(0, n, batch_size), desc="metacal", disable=not progress):
        idx = np.arange(s, min(s + batch_size, n))
        idx = idx[~failed[idx]]
        if len(idx) == 0:
            continue
        noise = fields[torch.as_tensor(index[idx])] if fields is not None else None
        cf = operator.counterfactuals(torch.as_tensor(x[idx]), names, generator=gen, noise=noise).numpy()
        side = cf.shape[-1]
        g, bad = estimate(cf.reshape(-1, side, side))
        g = np.where(np.asarray(bad)[:, None], np.nan, g)
        raw[idx] = g.reshape(len(idx), len(names), 2)
    d = operator.settings.step
    R = np.empty((n, 2, 2))
    R[:, :, 0] = (raw[:, 1] - raw[:, 2]) / (2 * d)
    R[:, :, 1] = (raw[:, 3] - raw[:, 4]) / (2 * d)
    failed |= ~np.isfinite(raw).all(axis=(1, 2))
    g0 = raw[:, 0].copy()
    g0[failed] = np.nan
    R[failed] = np.nan
    return {"g": g0, "R": R, "failed": failed}
