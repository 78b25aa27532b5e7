"""Moments (RRG-like) shear baseline, as in the paper authors' release.

Recipe (``shared/method.md``, "Moments baseline as released"):

1. weight width ``w`` = half-light radius measured on the stamp (pixels,
   :func:`wlshear.observables.half_light_radius`);
2. Gaussian-weighted second moments about the stamp centre (x, y) = (15.5, 15.5)::

       Q_ij = sum W I d_i d_j / sum W I,   W = exp(-r^2 / (2 w^2)),   d = (x - 15.5, y - 15.5)

   with x = column index, y = row index;
3. PSF correction: subtract ``s^2 = (w^-2 + sigma_psf^-2)^-1`` from Qxx and Qyy
   (sigma_psf = 0.784 px: the Gaussian PSF of FWHM 0.121" at 0.065"/px);
4. ``chi = (Qxx - Qyy + 2i Qxy) / (Qxx + Qyy)``.

The estimator returns **chi** itself (not chi/2 and not the shear-like g): its response to shear
is neither 1 nor 2 (weighting and the approximate PSF correction change it; for Gaussian galaxies
of a few pixels it is ~1.3-1.5, see :func:`gaussian_response`), and the release calibrates it with
the linear bias fit g_est = (1 + m) g_true + c (the release's ``rrg.npy`` has m ~ 0.12). Use
:func:`wlshear.metrics.bias.fit_bias` / ``calibrate`` on a simulation to do the same.
"""

from __future__ import annotations

import numpy as np

from wlshear.observables import DEFAULT_APERTURE_RADIUS, as_stamp_batch, half_light_radius, stamp_radii

__all__ = ["SIGMA_PSF_PX", "moments_ellipticity", "gaussian_response", "MomentsEstimator"]

#: Gaussian PSF sigma in pixels: FWHM 0.121" / 2.3548 / 0.065"/px.
SIGMA_PSF_PX = 0.784


def moments_ellipticity(
    stamps,
    sigma_psf: float = SIGMA_PSF_PX,
    weight_sigma=None,
    center: tuple[float, float] | None = None,
    r_max: float = DEFAULT_APERTURE_RADIUS,
    return_details: bool = False,
):
    """PSF-corrected weighted-moments ellipticity chi of each stamp (vectorised over N).

    Parameters
    ----------
    stamps : ``(N, ny, nx)`` or ``(ny, nx)`` array, axis order (y, x), counts.
    sigma_psf : PSF Gaussian sigma in pixels (default 0.784).
    weight_sigma : optional weight width(s) in pixels (scalar or ``(N,)``); default: the
        half-light radius measured on each stamp.
    center : (x, y) 0-indexed centre of the weight and moments; default stamp centre.
    r_max : aperture radius (px) for the half-light radius measurement.
    return_details : also return a dict with ``w``, ``qxx``, ``qyy``, ``qxy`` (PSF-corrected).

    Returns
    -------
    chi : ``(N, 2)`` float64 (chi1, chi2), NaN on failure.
    failed : ``(N,)`` bool; True where the stamp has non-finite pixels, no positive flux, no
        usable half-light radius, a non-positive weighted flux, or a non-positive PSF-corrected
        size Qxx + Qyy.
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
    w_safe = np.where(w_ok, w, 1.0)

    dx, dy, r = stamp_radii(ny, nx, center)
    wgt = np.exp(-0.5 * (r[None] ** 2) / (w_safe[:, None, None] ** 2))
    wi = wgt * arr
    norm = wi.sum(axis=(1, 2))
    norm_ok = norm > 0
    norm_safe = np.where(norm_ok, norm, 1.0)
    qxx = (wi * dx**2).sum(axis=(1, 2)) / norm_safe
    qyy = (wi * dy**2).sum(axis=(1, 2)) / norm_safe
    qxy = (wi * dx * dy).sum(axis=(1, 2)) / norm_safe

    s2 = 1.0 / (1.0 / w_safe**2 + 1.0 / sigma_psf**2)
    qxx = qxx - s2
    qyy = qyy - s2
    denom = qxx + qyy
    ok = finite & w_ok & norm_ok & (denom > 0)
    denom_safe = np.where(ok, denom, 1.0)
    chi = np.stack([(qxx - qyy) / denom_safe, 2.0 * qxy / denom_safe], axis=1)
    chi[~ok] = np.nan
    failed = ~ok
    if return_details:
        return chi, failed, {"w": w, "qxx": qxx, "qyy": qyy, "qxy": qxy}
    return chi, failed


def gaussian_response(sigma_gal: float, sigma_psf: float = SIGMA_PSF_PX, weight_sigma=None,
                      pixel_var: float = 1.0 / 12.0) -> float:
    """Analytic small-shear response d chi1 / d g1 of :func:`moments_ellipticity` for a Gaussian.

    A round Gaussian galaxy of sigma ``sigma_gal`` (pixels, before the PSF) sheared by small g
    has observed covariance C = sigma_gal^2 (1 + 2 g1) on the x axis and sigma_gal^2 (1 - 2 g1)
    on y (to first order), plus ``sigma_psf^2`` and the pixel's ``pixel_var`` (1/12 px^2). With a
    round Gaussian weight of width w, the weighted moment along an axis of variance a is
    a w^2 / (a + w^2). The weight defaults to the Gaussian's half-light radius
    sqrt(2 ln 2) * sigma_obs, as the estimator measures it. Ignores pixel discreteness beyond
    ``pixel_var`` and the finite stamp, so it is good to a few per cent for well-sampled galaxies.
    """
    s_obs2 = sigma_gal**2 + sigma_psf**2 + pixel_var
    w2 = (2.0 * np.log(2.0) * s_obs2) if weight_sigma is None else float(weight_sigma) ** 2
    dq_da = w2**2 / (s_obs2 + w2) ** 2  # derivative of a w^2 / (a + w^2)
    diff_per_g = 2.0 * (2.0 * sigma_gal**2) * dq_da  # Qxx - Qyy per unit g1
    q = s_obs2 * w2 / (s_obs2 + w2)
    s2 = 1.0 / (1.0 / w2 + 1.0 / sigma_psf**2)
    return float(diff_per_g / (2.0 * (q - s2)))


class MomentsEstimator:
    """Moments (RRG-like) baseline with the common estimator interface.

    ``estimate(stamps) -> (chi (N, 2), failed (N,))``; see :func:`moments_ellipticity`. The output
    is the un-calibrated chi; calibrate it with the linear bias fit.
    """

    name = "moments"

    def __init__(self, sigma_psf: float = SIGMA_PSF_PX, r_max: float = DEFAULT_APERTURE_RADIUS):
        self.sigma_psf = float(sigma_psf)
        self.r_max = float(r_max)

    def estimate(self, stamps):
        return moments_ellipticity(stamps, sigma_psf=self.sigma_psf, r_max=self.r_max)

    def __repr__(self) -> str:
        return f"MomentsEstimator(sigma_psf={self.sigma_psf}, r_max={self.r_max})"
