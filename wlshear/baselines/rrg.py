"""RRG shear estimator (Rhodes, Refregier & Groth 2000, ApJ 536, 79) for a round Gaussian PSF.

RRG measures Gaussian-weighted second **and fourth** moments, corrects both for the PSF, and
divides the ellipticity by a shear susceptibility built from the fourth moments, so that its output
is a shear estimate with no fitted calibration (the paper's Table 4 row "RRG" has m = +0.119 after
its own normalisation). The released "moments" baseline (:mod:`wlshear.baselines.moments`) is only
the first step of this: its chi is the same ellipticity, but without the susceptibility its
response to shear is ~1.3-1.5 and must be fitted on a simulation.

Conventions: stamps are ``(N, ny, nx)`` counts, axis order (y, x); x = column index; offsets
d = (x - cx, y - cy) about the stamp centre (15.5, 15.5) for 32 px; every length in **pixels**;
g1 > 0 stretches along x, g2 > 0 along y = x (``docs/CONVENTIONS.md``).

The steps, with w the weight width (px) and sigma_p the PSF's Gaussian sigma (px):

1. Normalised weighted moments ``J_ij = sum W I d_i d_j / sum W I`` and ``J_ijkl`` likewise, with
   ``W = exp(-r^2 / 2 w^2)``; w is the stamp's half-light radius (as the moments baseline),
   floored at ``min_weight``.
2. PSF correction, second and fourth order. For a Gaussian PSF and a Gaussian weight it is exact
   for any galaxy profile: the weight times the PSF kernel is a Gaussian weight of width
   ``w'^2 = w^2 + sigma_p^2`` on the galaxy before the PSF, times a Gaussian of width^2
   ``s^2 = sigma_p^2 w^2 / (w^2 + sigma_p^2)`` about ``kappa d`` with ``kappa = w^2 / w'^2``. So the
   observed moments are those of the pre-seeing galaxy under the weight ``w'``, shrunk by kappa
   and smoothed by s^2, and invert to::

       I_ij   = (J_ij - s^2 delta_ij) / kappa^2
       I_xxxx = (J_xxxx - 6 s^2 J_xx + 3 s^4) / kappa^4,   I_xxxy = (J_xxxy - 3 s^2 J_xy) / kappa^4
       I_xxyy = (J_xxyy - s^2 (J_xx + J_yy) + s^4) / kappa^4   (and the mirror images)

   RRG's published correction is the first order of this in ``sigma_p^2 / w^2``; the PSF's
   anisotropy terms vanish for a round PSF. The pixel is folded into sigma_p as its variance
   (1/12 px^2 per axis), which ``rrg_sigma_psf`` does by default.
3. Ellipticity ``e = (I_xx - I_yy, 2 I_xy) / (I_xx + I_yy)`` (the same as chi of
   :func:`wlshear.baselines.moments.moments_ellipticity` for a round PSF: the 1/kappa^2 cancels).
4. Shear susceptibility. A shear gamma of the pre-seeing galaxy maps its moments under the fixed
   round weight w' to first order as
   ``d e1 / d gamma1 = 2 - 2 e1^2 - K1 / (w'^2 T) + e1 K2 / (w'^2 T)`` with ``T = I_xx + I_yy``,
   ``K1 = I_xxxx - 2 I_xxyy + I_yyyy``, ``K2 = I_xxxx - I_yyyy`` (the last two terms are the weight's
   response; no weight, no terms); averaged over an isotropic population this is RRG's
   ``G = 2 - <e^2> - <lambda> / 2 + <e . mu> / 2`` with
   ``lambda = (I_xxxx + 2 I_xxyy + I_yyyy) / (w'^2 T)`` and
   ``mu = (I_xxxx - I_yyyy, 2 (I_xxxy + I_xyyy)) / (w'^2 T)`` (RRG write mu with the opposite sign).
   (``tests/test_baselines_rrg.py`` checks this against finite differences of sheared galaxies.)
5. Shear estimate ``g = e / G``, with G averaged over the population. Dividing each galaxy by
   its own G is biased (e and G are correlated), so it is not offered.

Scope: the PSF is a round Gaussian given by one sigma (the CLASH simulations' and the paper's);
RRG's first-order correction for PSF *anisotropy* is not implemented. A corrected ellipticity
``|e| >= e_max`` (default 2) fails: such a row has a corrected size T near zero, its e is noise
(|e| reaches 100 on real stamps) and it would ruin the average G (on cosmos_real_100, G falls
from 1.31 to 0.92 and m rises to +0.6 without the cut). Cutting at |e| = 1 instead selects on
shape (m = -0.07 there). The susceptibility is averaged over the batch (``response='ensemble'``, the RRG recipe: per-galaxy
fourth moments are too noisy to divide by, and the ratio of means is what has the right
response), or a fixed number given by the caller (``response=1.9``, e.g. the G of a larger
sample, for a catalogue or batches too small to average).

Known-answer check (``tests/test_baselines_rrg.py``): noiseless ring-paired Gaussian, exponential
and de Vaucouleurs galaxies of hlr 0.1-0.2" under the CLASH PSF and pixel come back with
|m| < 0.01 (0.008 at most); the weighted moments' chi of the same stamps has m from -0.06 to
+0.30, depending on the profile and size. Measured with ``evaluate.py`` (no fitted calibration,
``docs/TABLE4.md``): m = -0.004 +- 0.002 on 150,000 stamps of the embedded default population at
full noise, and m = +0.000 / +0.009 +- 0.011 on real HST galaxies (cosmos_real_100, F814W < 25),
where the simulation-calibrated CNN reads -0.27.
"""

from __future__ import annotations

import numpy as np

from wlshear.observables import DEFAULT_APERTURE_RADIUS, as_stamp_batch, half_light_radius, stamp_radii
from wlshear.sim.constants import PIXEL_SCALE, PSF_FWHM

__all__ = ["rrg_sigma_psf", "rrg_moments", "rrg_correct", "rrg_ellipticity", "rrg_susceptibility", "rrg_shear",
           "RRGEstimator"]


def rrg_sigma_psf(psf_fwhm: float = PSF_FWHM, pixel_scale: float = PIXEL_SCALE,
                  include_pixel: bool = True) -> float:
    """The round Gaussian PSF's sigma in pixels: FWHM (arcsec) / 2.3548 / pixel scale (arcsec/px),
    with the pixel's variance 1/12 px^2 added in quadrature when ``include_pixel`` (0.842 px for
    CLASH's 0.121" at 0.065"/px; 0.790 px without the pixel)."""
    sigma = float(psf_fwhm) / (2.0 * np.sqrt(2.0 * np.log(2.0))) / float(pixel_scale)
    return float(np.sqrt(sigma**2 + (1.0 / 12.0 if include_pixel else 0.0)))


def rrg_moments(stamps, weight_sigma=None, center=None, r_max: float = DEFAULT_APERTURE_RADIUS,
                min_weight: float = 1.0) -> dict:
    """Normalised Gaussian-weighted second and fourth moments of each stamp (pixels^2, ^4).

    ``weight_sigma``: the weight width(s) w in pixels (scalar or ``(N,)``); default the stamp's
    half-light radius, floored at ``min_weight`` px. ``center``: (x, y), 0-indexed; default the
    stamp centre. Returns a dict of ``(N,)`` float64 arrays: ``w``, ``xx``, ``yy``, ``xy``,
    ``xxxx``, ``xxxy``, ``xxyy``, ``xyyy``, ``yyyy``, and ``failed`` (bool: non-finite pixels, no
    usable half-light radius, or a non-positive weighted flux).
    """
    arr = as_stamp_batch(stamps)
    n, ny, nx = arr.shape
    finite = np.all(np.isfinite(arr), axis=(1, 2))
    arr = np.where(np.isfinite(arr), arr, 0.0)
    if weight_sigma is None:
        w = half_light_radius(arr, r_max=r_max, center=center)
    else:
        w = np.broadcast_to(np.asarray(weight_sigma, dtype=np.float64), (n,)).copy()
    w_ok = np.isfinite(w) & (w > 0)
    w = np.where(w_ok, np.maximum(w, min_weight), 1.0)
    dx, dy, r = stamp_radii(ny, nx, center)
    wi = np.exp(-0.5 * r[None] ** 2 / w[:, None, None] ** 2) * arr
    norm = wi.sum(axis=(1, 2))
    norm_ok = norm > 0
    norm = np.where(norm_ok, norm, 1.0)
    out = {"w": w, "failed": ~(finite & w_ok & norm_ok)}
    powers = {"xx": (2, 0), "yy": (0, 2), "xy": (1, 1), "xxxx": (4, 0), "xxxy": (3, 1),
              "xxyy": (2, 2), "xyyy": (1, 3), "yyyy": (0, 4)}
    for key, (px, py) in powers.items():
        out[key] = (wi * (dx**px * dy**py)[None]).sum(axis=(1, 2)) / norm
    return out


def rrg_correct(moms: dict, sigma_psf: float) -> dict:
    """Moments of the galaxy before the PSF under the weight w' (step 2 of the module docstring).

    ``moms`` as returned by :func:`rrg_moments`; ``sigma_psf`` the round Gaussian PSF's sigma in
    pixels (0: no PSF, the moments come back unchanged). Returns a dict with the same keys plus
    ``w_eff`` (w', px); ``failed`` also flags a non-positive corrected size ``I_xx + I_yy``.
    """
    sp = float(sigma_psf) ** 2
    w2 = moms["w"] ** 2
    s2 = sp * w2 / (sp + w2)  # the width^2 the weight and the PSF share
    k2 = (w2 / (w2 + sp)) ** 2  # kappa^2: offsets shrink by kappa = w^2 / (w^2 + sigma_p^2)
    jxx, jyy, jxy = moms["xx"], moms["yy"], moms["xy"]
    out = {"w": moms["w"], "w_eff": np.sqrt(w2 + sp),
           "xx": (jxx - s2) / k2, "yy": (jyy - s2) / k2, "xy": jxy / k2,
           "xxxx": (moms["xxxx"] - 6 * s2 * jxx + 3 * s2**2) / k2**2,
           "xxxy": (moms["xxxy"] - 3 * s2 * jxy) / k2**2,
           "xxyy": (moms["xxyy"] - s2 * (jxx + jyy) + s2**2) / k2**2,
           "xyyy": (moms["xyyy"] - 3 * s2 * jxy) / k2**2,
           "yyyy": (moms["yyyy"] - 6 * s2 * jyy + 3 * s2**2) / k2**2}
    out["failed"] = moms["failed"] | ~(out["xx"] + out["yy"] > 0)
    return out


def rrg_ellipticity(cor: dict) -> tuple[np.ndarray, np.ndarray]:
    """Ellipticity e = (I_xx - I_yy, 2 I_xy) / T of corrected moments, ``(N, 2)``, and T = I_xx + I_yy
    (px^2; 1 on failed rows)."""
    t = cor["xx"] + cor["yy"]
    t = np.where(cor["failed"], 1.0, t)
    return np.stack([(cor["xx"] - cor["yy"]) / t, 2.0 * cor["xy"] / t], axis=1), t


def rrg_susceptibility(cor: dict, per_galaxy: bool = False):
    """Shear susceptibility G of the corrected moments ``cor`` (step 4 of the module docstring).

    ``per_galaxy=False``: RRG's population average over the non-failed rows, a float (NaN when
    every row failed). ``per_galaxy=True``: ``(N, 2)`` array of each galaxy's own d e_i / d g_i
    (exact to first order in the shear for a fixed weight; dividing by it is biased, see step 5).
    """
    e, t = rrg_ellipticity(cor)
    wt = cor["w_eff"] ** 2 * t
    lam = (cor["xxxx"] + 2 * cor["xxyy"] + cor["yyyy"]) / wt
    mu = np.stack([cor["xxxx"] - cor["yyyy"], 2 * (cor["xxxy"] + cor["xyyy"])], axis=1) / wt[:, None]
    if per_galaxy:
        k1 = np.stack([cor["xxxx"] - 2 * cor["xxyy"] + cor["yyyy"], 4 * cor["xxyy"]], axis=1)
        return 2.0 - 2.0 * e**2 - k1 / wt[:, None] + e * mu
    ok = ~cor["failed"]
    if not ok.any():
        return float("nan")
    return float(2.0 - np.mean((e[ok] ** 2).sum(axis=1)) - 0.5 * np.mean(lam[ok])
                 + 0.5 * np.mean((e[ok] * mu[ok]).sum(axis=1)))


def rrg_shear(stamps, sigma_psf: float | None = None, response="ensemble", weight_sigma=None,
              center=None, r_max: float = DEFAULT_APERTURE_RADIUS, min_weight: float = 1.0,
              e_max: float = 2.0, return_details: bool = False):
    """RRG shear estimate of each stamp (module docstring, steps 1-5).

    Parameters
    ----------
    stamps : ``(N, ny, nx)`` or ``(ny, nx)`` counts, axis order (y, x).
    sigma_psf : the round Gaussian PSF's sigma in pixels, pixel included; default
        :func:`rrg_sigma_psf` (CLASH: 0.842 px).
    response : ``'ensemble'`` (G averaged over the non-failed rows of this batch) or a positive
        number (a fixed G).
    weight_sigma, center, r_max, min_weight : as :func:`rrg_moments`.
    e_max : rows whose corrected ellipticity has ``|e| >= e_max`` fail (a noise-dominated
        measurement: with T near zero |e| reaches 100 on real stamps and ruins the average G).

    Returns
    -------
    g : ``(N, 2)`` float64 (g1, g2), NaN where ``failed``.
    failed : ``(N,)`` bool: the failures of :func:`rrg_correct` and ``|e| >= e_max``.
    details : (with ``return_details``) the corrected moments, ``e`` and the susceptibility ``G``.
    """
    sigma_psf = rrg_sigma_psf() if sigma_psf is None else float(sigma_psf)
    if isinstance(response, str):
        if response != "ensemble":
            raise ValueError(f"RRG response must be 'ensemble' or a positive number, got {response!r}")
    elif not (np.isfinite(float(response)) and float(response) > 0):
        raise ValueError(f"a fixed RRG response must be a positive number, got {response!r}")
    cor = rrg_correct(rrg_moments(stamps, weight_sigma, center, r_max, min_weight), sigma_psf)
    e, _ = rrg_ellipticity(cor)
    cor["failed"] = cor["failed"] | ~(np.hypot(e[:, 0], e[:, 1]) < e_max)
    G = rrg_susceptibility(cor) if response == "ensemble" else float(response)
    failed = cor["failed"].copy()
    g = e / G
    g[failed] = np.nan
    if return_details:
        return g, failed, {**cor, "e": e, "G": G}
    return g, failed


class RRGEstimator:
    """RRG (Rhodes, Refregier & Groth 2000) with the common estimator interface.

    ``estimate(stamps) -> (g (N, 2), failed (N,))``; see :func:`rrg_shear`. With the default
    ``response='ensemble'`` the estimate depends on the whole batch (``whole_batch`` is True), as
    RRG's population-averaged susceptibility does. ``sigma_psf`` in pixels (default: CLASH's PSF
    with the pixel, :func:`rrg_sigma_psf`); ``min_weight`` the smallest weight width, px.
    """

    name = "rrg"

    def __init__(self, sigma_psf: float | None = None, response="ensemble",
                 r_max: float = DEFAULT_APERTURE_RADIUS, min_weight: float = 1.0, e_max: float = 2.0):
        self.sigma_psf = rrg_sigma_psf() if sigma_psf is None else float(sigma_psf)
        if not (self.sigma_psf >= 0):
            raise ValueError(f"sigma_psf must be >= 0 pixels, got {sigma_psf!r}")
        self.response = response if isinstance(response, str) else float(response)
        self.r_max = float(r_max)
        self.min_weight = float(min_weight)
        self.e_max = float(e_max)
        if not self.e_max > 0:
            raise ValueError(f"e_max must be positive, got {e_max!r}")
        rrg_shear(np.ones((1, 4, 4)), sigma_psf=self.sigma_psf, response=self.response)  # refuse now

    @property
    def whole_batch(self) -> bool:
        """The ensemble susceptibility is averaged over the batch: callers must not split it."""
        return self.response == "ensemble"

    def estimate(self, stamps):
        return rrg_shear(stamps, sigma_psf=self.sigma_psf, response=self.response,
                         r_max=self.r_max, min_weight=self.min_weight, e_max=self.e_max)

    def __repr__(self) -> str:
        return (f"RRGEstimator(sigma_psf={self.sigma_psf:.4f}, response={self.response!r}, "
                f"r_max={self.r_max}, min_weight={self.min_weight}, e_max={self.e_max})")
