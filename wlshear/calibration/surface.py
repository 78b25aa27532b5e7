"""Calibration surface: multiplicative and additive shear bias as smooth functions of observables.

A shear estimator calibrated once on a whole population, ``(g - c) / (1 + m)``, is unbiased only on
average: its response ``1 + m`` typically depends on the galaxy's magnitude and size. The surface
models, per component k,

    g_est,k = (1 + m_k(o)) g_true,k + c_k(o)

where ``o`` are observables *measured on the stamp* (never the truth) with
:func:`wlshear.observables.measure_observables`: aperture magnitude ``mag`` (CLASH
zero-point), half-light radius ``hlr_px`` [pixels] and ``snr``. ``m_k`` and ``c_k`` are linear
combinations of basis functions of the features

- ``mag``: the measured magnitude;
- ``log10_hlr``: log10 of the measured half-light radius in pixels;
- ``log10_snr``: log10 of the measured aperture S/N,

either low-order polynomials (``basis='poly'``, all monomials of total degree <= ``degree`` in
standardised features) or piecewise-linear interpolation between bin centres (``basis='linear'``:
tensor-product hat functions with knots at quantiles of the fitting sample, i.e.
binned-and-interpolated). Features are clipped to the range spanned by the fitting sample (no
extrapolation); a galaxy whose observable cannot be measured (flux <= 0 -> mag NaN) gets the
sample median of that feature (and is counted in ``n_filled``).

The fit is one linear least-squares problem per component: ``g_est - g = sum_j a_j B_j(o) g +
sum_j b_j B_j(o)``. With ring pairs (``pair_ids``) the two estimates of a pair are averaged first,
which cancels the intrinsic shape to first order; the model of the pair mean is the mean of the
members' own ``m(o)``, ``c(o)`` (each member at its own measured observables, as when the surface is
applied galaxy by galaxy). Feature ranges, fill values and knots come from the pair-mean observables.

The correction applied per galaxy is ``g_cal = (g - c(o)) / (1 + m(o))``, with ``1 + m`` floored
at ``min_response`` to keep it finite. Save/load as JSON (:meth:`CalibrationSurface.save`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from wlshear.observables import measure_observables
from wlshear.utils.plain import to_plain

__all__ = ["CalibrationSurface", "fit_surface", "pair_means", "FEATURES", "features_from_observables"]

#: feature name -> (observable key, transform)
FEATURES = {
    "mag": ("mag", "identity"),
    "log10_hlr": ("hlr_px", "log10"),
    "log10_snr": ("snr", "log10"),
}
SURFACE_FORMAT = "wlshear-calibration-surface"
SURFACE_VERSION = 1


def _check_features(features) -> list[str]:
    features = [str(f) for f in features]
    if not features:
        raise ValueError("a calibration surface needs at least one feature")
    bad = [f for f in features if f not in FEATURES]
    if bad:
        raise ValueError(f"unknown surface feature(s) {bad}; choose from {sorted(FEATURES)}")
    return features


def features_from_observables(obs: dict, features) -> np.ndarray:
    """``(N, F)`` feature matrix from an observables dict (``measure_observables`` output).

    Non-positive hlr / S/N give NaN under log10 (filled later by the surface)."""
    cols = []
    for f in _check_features(features):
        key, tr = FEATURES[f]
        if key not in obs:
            raise ValueError(f"feature {f!r} needs observable {key!r}; got observables {sorted(obs)}")
        x = np.asarray(obs[key], dtype=np.float64)
        if tr == "log10":
            with np.errstate(divide="ignore", invalid="ignore"):
                x = np.where(x > 0, np.log10(np.where(x > 0, x, 1.0)), np.nan)
        cols.append(x)
    return np.stack(cols, axis=1)


def pair_means(values: np.ndarray, pair_ids) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware mean of ``values`` (N,) or (N, k) over rows sharing a pair id.

    Returns ``(means (P, ...), inverse (N,))`` with ``means[inverse]`` broadcasting back to rows."""
    v = np.asarray(values, dtype=np.float64)
    _, inv = np.unique(np.asarray(pair_ids), return_inverse=True)
    p = int(inv.max()) + 1 if inv.size else 0
    flat = v.reshape(len(v), -1)
    ok = np.isfinite(flat)
    s = np.stack([np.bincount(inv, weights=np.where(ok[:, j], flat[:, j], 0.0), minlength=p)
                  for j in range(flat.shape[1])], 1)
    n = np.stack([np.bincount(inv, weights=ok[:, j].astype(float), minlength=p) for j in range(flat.shape[1])], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    return mean.reshape((p,) + v.shape[1:]), inv


class CalibrationSurface:
    """m(o), c(o) per shear component as linear combinations of basis functions of observables.

    Build with :func:`fit_surface`; apply with :meth:`apply` (given observables) or
    :meth:`apply_to_stamps` (measures them on the stamps first).

    Attributes (all JSON-able): ``features``, ``basis`` ('poly' / 'linear'), ``degree``,
    ``center`` / ``scale`` (poly standardisation), ``knots`` (per feature, 'linear'), ``lo`` /
    ``hi`` (clip range), ``fill`` (value for unmeasurable features), ``coef_m`` / ``coef_c``
    ``(2, n_basis)``, ``min_response``, ``observable_kwargs`` (passed to ``measure_observables``)
    and ``diagnostics``.
    """

    def __init__(self, features, basis: str = "poly", degree: int = 2, center=None, scale=None,
                 knots=None, lo=None, hi=None, fill=None, coef_m=None, coef_c=None,
                 min_response: float = 0.1, observable_kwargs: dict | None = None,
                 diagnostics: dict | None = None):
        self.features = _check_features(features)
        if basis not in ("poly", "linear"):
            raise ValueError(f"basis must be 'poly' or 'linear', got {basis!r}")
        self.basis = basis
        self.degree = int(degree)
        nf = len(self.features)
        self.center = np.zeros(nf) if center is None else np.asarray(center, dtype=np.float64)
        self.scale = np.ones(nf) if scale is None else np.asarray(scale, dtype=np.float64)
        self.knots = [np.asarray(k, dtype=np.float64) for k in (knots or [])]
        self.lo = np.full(nf, -np.inf) if lo is None else np.asarray(lo, dtype=np.float64)
        self.hi = np.full(nf, np.inf) if hi is None else np.asarray(hi, dtype=np.float64)
        self.fill = np.zeros(nf) if fill is None else np.asarray(fill, dtype=np.float64)
        if basis == "linear" and len(self.knots) != nf:
            raise ValueError(f"basis 'linear' needs knots for each of the {nf} features")
        nb = self.n_basis
        # (n_stages, 2, n_basis); a (2, n_basis) input is one stage
        self.coef_m = np.zeros((1, 2, nb)) if coef_m is None else np.asarray(coef_m, dtype=np.float64).reshape(-1, 2, nb)
        self.coef_c = np.zeros((1, 2, nb)) if coef_c is None else np.asarray(coef_c, dtype=np.float64).reshape(-1, 2, nb)
        if self.coef_m.shape != self.coef_c.shape:
            raise ValueError(f"coef_m {self.coef_m.shape} and coef_c {self.coef_c.shape} must have the same shape")
        self.min_response = float(min_response)
        self.observable_kwargs = dict(observable_kwargs or {})
        self.diagnostics = dict(diagnostics or {})

    # ------------------------------------------------------------------ basis
    def _exponents(self) -> list[tuple[int, ...]]:
        nf = len(self.features)
        return [e for d in range(self.degree + 1) for e in itertools.product(range(d + 1), repeat=nf) if sum(e) == d]

    @property
    def n_basis(self) -> int:
        if self.basis == "poly":
            return len(self._exponents())
        return int(np.prod([len(k) for k in self.knots]))

    def prepare(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fill non-finite features and clip to the fitted range; returns (x, filled mask (N,))."""
        x = np.array(x, dtype=np.float64, copy=True).reshape(-1, len(self.features))
        bad = ~np.isfinite(x)
        x = np.where(bad, self.fill[None, :], x)
        x = np.clip(x, self.lo[None, :], self.hi[None, :])
        return x, bad.any(axis=1)

    def design(self, x: np.ndarray) -> np.ndarray:
        """Basis matrix ``(N, n_basis)`` for features ``x (N, F)`` (already prepared)."""
        if self.basis == "poly":
            z = (x - self.center[None, :]) / self.scale[None, :]
            return np.stack([np.prod(z ** np.asarray(e)[None, :], axis=1) for e in self._exponents()], axis=1)
        hats = [_hat_basis(x[:, j], self.knots[j]) for j in range(len(self.features))]
        out = hats[0]
        for h in hats[1:]:
            out = (out[:, :, None] * h[:, None, :]).reshape(len(x), -1)
        return out

    # ------------------------------------------------------------------ evaluation
    def features_of(self, obs: dict) -> np.ndarray:
        return features_from_observables(obs, self.features)

    def m_c(self, obs: dict) -> tuple[np.ndarray, np.ndarray]:
        """Effective ``m (N, 2)``, ``c (N, 2)`` at the given observables (dict of (N,) arrays).

        Stages compose: after ``(g - c1) / r1`` then ``(. - c2) / r2`` (``r = max(1 + m, min_response)``)
        the total is ``(g - c1 - c2 r1) / (r1 r2)``, i.e. ``1 + m = r1 r2`` and ``c = c1 + c2 r1``."""
        x, _ = self.prepare(self.features_of(obs))
        b = self.design(x)
        resp = np.ones((len(b), 2))
        c = np.zeros((len(b), 2))
        for cm, cc in zip(self.coef_m, self.coef_c):
            r = np.maximum(1.0 + b @ cm.T, self.min_response)
            c = c + (b @ cc.T) * resp
            resp = resp * r
        return resp - 1.0, c

    def apply(self, g, obs: dict) -> np.ndarray:
        """Corrected shears ``(g - c(o)) / (1 + m(o))``, ``g (N, 2)``; NaN rows stay NaN."""
        g = np.asarray(g, dtype=np.float64)
        if g.ndim != 2 or g.shape[1] != 2:
            raise ValueError(f"g must be (N, 2), got {g.shape}")
        m, c = self.m_c(obs)
        if len(m) != len(g):
            raise ValueError(f"observables describe {len(m)} galaxies but g has {len(g)} rows")
        return (g - c) / (1.0 + m)

    def measure(self, stamps) -> dict:
        """Observables of ``stamps`` with the measurement settings the surface was fitted with."""
        return measure_observables(stamps, **self.observable_kwargs)

    def apply_to_stamps(self, g, stamps) -> np.ndarray:
        """Measure the observables on ``stamps`` and apply the surface to ``g``."""
        return self.apply(g, self.measure(stamps))

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SURFACE_FORMAT, "version": SURFACE_VERSION,
            "features": list(self.features), "basis": self.basis, "degree": self.degree,
            "center": self.center.tolist(), "scale": self.scale.tolist(),
            "knots": [k.tolist() for k in self.knots],
            "lo": self.lo.tolist(), "hi": self.hi.tolist(), "fill": self.fill.tolist(),
            "coef_m": self.coef_m.tolist(), "coef_c": self.coef_c.tolist(),
            "min_response": self.min_response,
            "observable_kwargs": to_plain(self.observable_kwargs),
            "diagnostics": to_plain(self.diagnostics),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationSurface":
        if not isinstance(d, dict) or d.get("format") != SURFACE_FORMAT:
            raise ValueError(f"not a calibration surface (format={d.get('format') if isinstance(d, dict) else type(d)})")
        if d.get("version") != SURFACE_VERSION:
            raise ValueError(f"unsupported calibration surface version {d.get('version')} (reads {SURFACE_VERSION})")
        kw = {k: d[k] for k in ("features", "basis", "degree", "center", "scale", "knots", "lo", "hi", "fill",
                                "coef_m", "coef_c", "min_response", "observable_kwargs", "diagnostics") if k in d}
        return cls(**kw)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path) -> "CalibrationSurface":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration surface at {path}; fit one with "
                                    "`python -m wlshear.tasks.fit_surface`")
        return cls.from_dict(json.loads(path.read_text()))

    def __repr__(self) -> str:
        return (f"CalibrationSurface(features={self.features}, basis={self.basis!r}, "
                f"n_basis={self.n_basis}, n_fit={self.diagnostics.get('n_fit')})")


def _hat_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Piecewise-linear (hat) functions at ``knots`` evaluated at ``x`` (N,) -> (N, K); partition of unity."""
    k = len(knots)
    if k == 1:
        return np.ones((len(x), 1))
    xc = np.clip(x, knots[0], knots[-1])
    i = np.clip(np.searchsorted(knots, xc, side="right") - 1, 0, k - 2)
    t = (xc - knots[i]) / (knots[i + 1] - knots[i])
    out = np.zeros((len(x), k))
    out[np.arange(len(x)), i] = 1.0 - t
    out[np.arange(len(x)), i + 1] += t
    return out


def fit_surface(g_true, g_est, observables: dict, pair_ids=None, failed=None,
                features=("mag", "log10_hlr"), basis: str = "poly", degree: int = 3,
                n_knots: int = 4, ridge: float = 1e-6, clip_quantiles=(0.01, 0.99),
                min_response: float = 0.1, observable_kwargs: dict | None = None,
                pair_averaged_basis: bool = True, n_stages: int = 2) -> CalibrationSurface:
    """Fit m(o), c(o) per component by linear least squares (see module docstring).

    Parameters
    ----------
    g_true, g_est : ``(N, 2)`` true and estimated shears (estimates as the estimator outputs them,
        e.g. already globally calibrated: the surface corrects what remains).
    observables : dict of ``(N,)`` arrays measured on the stamps (``measure_observables``).
    pair_ids : ring-pair ids; pairs are averaged (estimates and observables) before the fit.
    failed : ``(N,)`` failure flags; failed rows (and rows with non-finite shears) are excluded
        (a pair with a failed member is excluded).
    features : subset of :data:`FEATURES`.
    basis, degree, n_knots : 'poly' of total ``degree``, or 'linear' with ``n_knots`` quantile knots
        per feature.
    ridge : Tikhonov regularisation relative to the mean diagonal of the normal matrix.
    clip_quantiles : the feature range kept (and clipped to when applying).
    pair_averaged_basis : with pairs, regress the pair-mean estimate on the pair mean of the
        members' basis rows B(o_a), B(o_b) (default; matches the per-galaxy application, where each
        member is corrected with its own observables) instead of B at the pair-mean observable.
    n_stages : successive corrections, each fitted on the output of the previous ones (see module
        docstring); 2 removes most of what one linear stage leaves.
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    features = _check_features(features)
    g_true = np.asarray(g_true, dtype=np.float64)
    g_est = np.asarray(g_est, dtype=np.float64)
    if g_true.shape != g_est.shape or g_true.ndim != 2 or g_true.shape[1] != 2:
        raise ValueError(f"g_true and g_est must both be (N, 2); got {g_true.shape}, {g_est.shape}")
    x = features_from_observables(observables, features)
    if len(x) != len(g_true):
        raise ValueError(f"observables have {len(x)} rows, shears {len(g_true)}")
    rows = _fit_rows(g_true, g_est, x, pair_ids, failed)
    gt, _ = pair_means(rows["g_true"], rows["pairs"])
    xf, _ = pair_means(rows["x"], rows["pairs"])
    if len(gt) < 10:
        raise ValueError(f"too few usable galaxies/pairs ({len(gt)}) to fit a calibration surface")
    surf = CalibrationSurface(features, basis=basis, degree=degree, min_response=min_response,
                              observable_kwargs=observable_kwargs,
                              **_feature_ranges(xf, len(features), clip_quantiles, basis, n_knots))
    xp, filled = surf.prepare(xf)
    xr, filled_rows = surf.prepare(rows["x"])
    B_rows = surf.design(xr)
    if pair_averaged_basis and pair_ids is not None:
        # the pair mean of the members' own m(o), c(o): consistent with the per-galaxy correction,
        # which uses each member's own (noisy) observables
        B, _ = pair_means(B_rows, rows["pairs"])
    else:
        B = surf.design(xp)
    surf.coef_m, surf.coef_c, rms, m_err_mean = _fit_stages(B, B_rows, gt, rows["g_est"], rows["pairs"], n_stages,
                                                            ridge, min_response)
    surf.diagnostics = {"n_fit": int(len(gt)), "paired": pair_ids is not None, "n_rows": rows["n_rows"],
                        "n_filled_pairs": int(filled.sum()), "n_filled_rows": int(filled_rows.sum()),
                        "n_stages": int(n_stages), "rms_residual": rms.tolist(),
                        "mean_m_err": m_err_mean.tolist(), "ridge": float(ridge)}
    return surf


def _fit_rows(g_true, g_est, x, pair_ids, failed) -> dict:
    """The rows a surface is fitted on: usable rows (finite, not failed), whole pairs only; their
    pair ids (each row its own "pair" without ring pairs) and the count of usable rows."""
    ok = np.all(np.isfinite(g_true), 1) & np.all(np.isfinite(g_est), 1)
    if failed is not None:
        ok &= ~np.asarray(failed, dtype=bool)
    if pair_ids is not None:
        _, inv = np.unique(np.asarray(pair_ids), return_inverse=True)
        bad_pair = np.bincount(inv, weights=(~ok).astype(float)) > 0
        keep = ~bad_pair[inv]
        pk = np.asarray(pair_ids)[keep]
    else:
        keep = ok
        pk = np.arange(int(ok.sum()))  # every row its own "pair"
    return {"g_true": g_true[keep], "g_est": g_est[keep], "x": x[keep], "pairs": pk, "n_rows": int(ok.sum())}


def _feature_ranges(xf, n_features: int, clip_quantiles, basis: str, n_knots: int) -> dict:
    """Fill values (medians), clip range (quantiles), centre, scale and (basis linear) knots of the
    features ``xf`` (pair means)."""
    finite = np.isfinite(xf)
    fill = np.array([np.median(xf[finite[:, j], j]) if finite[:, j].any() else 0.0 for j in range(n_features)])
    qlo, qhi = clip_quantiles
    lo = np.array([np.quantile(xf[finite[:, j], j], qlo) for j in range(n_features)])
    hi = np.array([np.quantile(xf[finite[:, j], j], qhi) for j in range(n_features)])
    scale = np.array([max(np.std(np.clip(xf[finite[:, j], j], lo[j], hi[j])), 1e-6) for j in range(n_features)])
    knots = []
    if basis == "linear":
        if n_knots < 1:
            raise ValueError(f"n_knots must be >= 1, got {n_knots}")
        for j in range(n_features):
            if n_knots == 1:
                knots.append(np.array([fill[j]]))
                continue
            xj = np.clip(xf[finite[:, j], j], lo[j], hi[j])
            # knots at the centres (in quantile) of n_knots equal-count bins, plus the range ends
            q = np.quantile(xj, (np.arange(n_knots) + 0.5) / n_knots)
            knots.append(np.unique(np.concatenate([[lo[j]], q, [hi[j]]])))
    return {"center": fill.copy(), "scale": scale, "knots": knots, "lo": lo, "hi": hi, "fill": fill}


def _fit_stages(B, B_rows, gt, ge_rows, pairs, n_stages: int, ridge: float, min_response: float):
    """Successive ridge least-squares stages of m(o), c(o) per component, each on the output of
    the previous ones; returns (coef_m, coef_c, rms residual per stage, mean m error of stage 1)."""
    nb = B.shape[1]
    coef_m = np.zeros((n_stages, 2, nb))
    coef_c = np.zeros((n_stages, 2, nb))
    rms = np.zeros((n_stages, 2))
    m_err_mean = np.zeros(2)
    ge_cur = ge_rows.copy()
    for st in range(n_stages):
        ge, _ = pair_means(ge_cur, pairs)
        for k in range(2):
            X = np.concatenate([B * gt[:, k:k + 1], B], axis=1)
            y = ge[:, k] - gt[:, k]
            A = X.T @ X
            lam = ridge * np.trace(A) / A.shape[0]
            A_reg = A + lam * np.eye(A.shape[0])
            beta = np.linalg.solve(A_reg, X.T @ y)
            coef_m[st, k], coef_c[st, k] = beta[:nb], beta[nb:]
            resid = y - X @ beta
            rms[st, k] = float(np.sqrt(np.mean(resid ** 2)))
            if st == 0:
                cov = np.linalg.inv(A_reg) * rms[st, k] ** 2
                bm = B.mean(0)  # error of m(o) averaged over the sample's basis rows: the fit's precision
                m_err_mean[k] = float(np.sqrt(bm @ cov[:nb, :nb] @ bm))
        # this stage's per-galaxy correction, each member at its own observables
        m_s, c_s = B_rows @ coef_m[st].T, B_rows @ coef_c[st].T
        ge_cur = (ge_cur - c_s) / np.maximum(1.0 + m_s, min_response)
    return coef_m, coef_c, rms, m_err_mean
