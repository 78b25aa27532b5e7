"""Selection cuts for CLASH weak-lensing sources, as bits of an integer ``flags`` column.

Bits (0 = the source passes every cut):

====  =================  ==================================================================
bit   name               meaning
====  =================  ==================================================================
1     CUT_EDGE           32 px stamp box not fully inside the image (or non-finite position)
2     CUT_BAD_PIXELS     a bad pixel (``Field.bad``) inside the stamp box
4     CUT_LOW_IVAR       mean inverse variance in the stamp box < ``min_mean_ivar`` (5e4)
8     CUT_STAR           classified as a star (see :func:`classify_stars`)
16    CUT_PHOTOMETRY     non-finite / non-positive flux, magnitude, mu_max or radius
32    CUT_UNMATCHED      no baseline-catalogue counterpart (only if ``matched`` is given)
====  =================  ==================================================================

Star/galaxy separation. Point sources are images of the PSF, so their peak surface brightness
tracks their magnitude, ``mu_max - mag = d_star`` (a constant set by the PSF), and their
half-light radius is that of the PSF (FWHM 0.121" -> r_half ~ 0.93 px at 0.065"/px). Galaxies
are less concentrated: larger ``mu_max - mag`` and larger radius. The automatic classifier

1. takes *candidates*: finite photometry, ``mag <= mag_faint`` and
   ``flux_radius < r_candidate_max`` (default 1.6 x the PSF half-light radius);
2. estimates the locus ``d_star`` as the densest value of ``mu_max - mag`` among candidates
   (mode of a smoothed histogram near the PSF prediction, refined by iterative 3-sigma-clipped
   median), and the stellar radius ``r_star`` as the median radius of the locus members;
3. calls a source a star if ``|mu_max - mag - d_star| < d_tol`` and
   ``flux_radius < r_star_max`` with ``d_tol = max(d_tol_min, 3 * robust scatter)`` and
   ``r_star_max = r_star + max(r_tol_min, 3 * robust scatter of r)``.

If fewer than ``min_stars`` candidates sit on the locus, PSF-based defaults are used instead
(reported as ``method='psf_default'`` in the summary). Every quantity can be overridden
explicitly (``d_star``, ``d_tol``, ``r_star_max``).
"""

from __future__ import annotations

import math

import numpy as np

from wlshear.sim.constants import PIXEL_SCALE, PSF_FWHM

from .stamps import STAMP_SIZE, stamp_inside, stamp_origin

CUT_EDGE = 1
CUT_BAD_PIXELS = 2
CUT_LOW_IVAR = 4
CUT_STAR = 8
CUT_PHOTOMETRY = 16
CUT_UNMATCHED = 32
CUT_NAMES = {
    CUT_EDGE: "edge",
    CUT_BAD_PIXELS: "bad_pixels",
    CUT_LOW_IVAR: "low_ivar",
    CUT_STAR: "star",
    CUT_PHOTOMETRY: "photometry",
    CUT_UNMATCHED: "unmatched",
}

def psf_half_light_radius(fwhm_arcsec: float = PSF_FWHM, pixel_scale: float = PIXEL_SCALE) -> float:
    """Half-light radius in pixels of a circular Gaussian PSF: sigma * sqrt(2 ln 2) = FWHM / 2."""
    return 0.5 * fwhm_arcsec / pixel_scale


def psf_mu_minus_mag(fwhm_arcsec: float = PSF_FWHM, pixel_scale: float = PIXEL_SCALE) -> float:
    """Expected ``mu_max - mag`` of a Gaussian point source (peak pixel, averaged over sub-pixel
    centring), independent of the zero point: -2.5 log10(peak_fraction / pixel_scale**2)."""
    sigma = fwhm_arcsec / pixel_scale / (2 * math.sqrt(2 * math.log(2)))
    fracs = []
    for off in np.linspace(-0.5, 0.5, 11):  # centring offsets of the peak pixel
        frac = 0.5 * (math.erf((0.5 - off) / (sigma * math.sqrt(2))) + math.erf((0.5 + off) / (sigma * math.sqrt(2))))
        fracs.append(frac)
    f1 = np.mean(fracs)
    return -2.5 * math.log10(f1 * f1 / pixel_scale**2)


def _box_sums(arr: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: int) -> np.ndarray:
    """Sum of ``arr`` over size x size boxes starting at (x0, y0) (boxes must be inside)."""
    sat = np.zeros((arr.shape[0] + 1, arr.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(arr, axis=0, dtype=np.float64), axis=1, out=sat[1:, 1:])
    return sat[y0 + size, x0 + size] - sat[y0, x0 + size] - sat[y0 + size, x0] + sat[y0, x0]


def _robust_sigma(v: np.ndarray) -> float:
    if v.size < 2:
        return 0.0
    return 1.4826 * float(np.median(np.abs(v - np.median(v))))


def _stellar_locus(dc, rc, centre0: float, d_star, min_stars: int) -> tuple:
    """(d_fit, d_sig, r_fit, r_sig, n_locus) of the stellar locus among candidates with
    ``dc = mu_max - mag`` and radii ``rc``: the mode of the smoothed histogram of ``dc`` within
    +-1.5 mag of ``centre0`` (or ``d_star``), refined by iterative 3-sigma-clipped medians; NaN
    (and the locus size) when fewer than ``min_stars`` candidates sit on it."""
    d_fit, d_sig, r_fit, r_sig, n_locus = np.nan, np.nan, np.nan, np.nan, 0
    if dc.size < min_stars:
        return d_fit, d_sig, r_fit, r_sig, n_locus
    edges = np.arange(centre0 - 1.5, centre0 + 1.5 + 1e-9, 0.05)
    h, _ = np.histogram(dc, bins=edges)
    hs = np.convolve(h, np.exp(-0.5 * (np.arange(-4, 5) / 2.0) ** 2), mode="same")
    centre = 0.5 * (edges[np.argmax(hs)] + edges[np.argmax(hs) + 1]) if hs.max() > 0 else centre0
    if d_star is not None:
        centre = d_star
    sel = np.abs(dc - centre) < 0.5
    for _ in range(5):
        if sel.sum() < 2:
            break
        centre = float(np.median(dc[sel])) if d_star is None else d_star
        s = max(_robust_sigma(dc[sel]), 0.02)
        sel = np.abs(dc - centre) < max(3 * s, 0.1)
    n_locus = int(sel.sum())
    if n_locus >= min_stars:
        d_fit, d_sig = centre, _robust_sigma(dc[sel])
        r_fit, r_sig = float(np.median(rc[sel])), _robust_sigma(rc[sel])
    return d_fit, d_sig, r_fit, r_sig, n_locus


def classify_stars(
    mag,
    mu_max,
    radius,
    *,
    pixel_scale: float = PIXEL_SCALE,
    psf_fwhm_arcsec: float = PSF_FWHM,
    mag_faint: float | None = None,
    r_candidate_max: float | None = None,
    d_star: float | None = None,
    d_tol: float | None = None,
    d_tol_min: float = 0.25,
    r_star_max: float | None = None,
    r_tol_min: float = 0.3,
    min_stars: int = 5,
) -> tuple[np.ndarray, dict]:
    """Star/galaxy separation in the (mu_max, mag) and (flux_radius, mag) planes.

    Parameters
    ----------
    mag : magnitudes; mu_max : peak surface brightness (mag/arcsec^2); radius : half-light
        radius in pixels.
    mag_faint : only sources brighter than this can be stars (None = no limit).
    r_candidate_max : radius bound (px) for locus candidates (default 1.6 x PSF r_half).
    d_star, d_tol, r_star_max : explicit overrides of the fitted locus offset
        (mu_max - mag, mag/arcsec^2), its half-width, and the maximum stellar radius (px).

    Returns
    -------
    is_star : bool array; params : dict with the values used and ``method``
        (``"auto"``, ``"psf_default"`` or ``"override"`` if every value was given).
    """
    mag = np.asarray(mag, dtype=np.float64)
    mu = np.asarray(mu_max, dtype=np.float64)
    r = np.asarray(radius, dtype=np.float64)
    d = mu - mag
    finite = np.isfinite(d) & np.isfinite(r) & (r > 0)
    bright = finite if mag_faint is None else finite & (mag <= mag_faint)
    r_psf = psf_half_light_radius(psf_fwhm_arcsec, pixel_scale)
    d_psf = psf_mu_minus_mag(psf_fwhm_arcsec, pixel_scale)
    if r_candidate_max is None:
        r_candidate_max = 1.6 * r_psf
    method = "override" if (d_star is not None and d_tol is not None and r_star_max is not None) else "auto"

    d_fit, d_sig, r_fit, r_sig, n_locus = np.nan, np.nan, np.nan, np.nan, 0
    if method == "auto":
        cand = bright & (r < r_candidate_max)
        d_fit, d_sig, r_fit, r_sig, n_locus = _stellar_locus(d[cand], r[cand], d_psf if d_star is None else d_star,
                                                             d_star, min_stars)
        if np.isfinite(d_fit):
            d_use = d_fit if d_star is None else d_star
            tol_use = max(d_tol_min, 3 * d_sig) if d_tol is None else d_tol
            rmax_use = r_fit + max(r_tol_min, 3 * r_sig) if r_star_max is None else r_star_max
        else:
            method = "psf_default"
            d_use = d_psf if d_star is None else d_star
            tol_use = 2 * d_tol_min if d_tol is None else d_tol
            rmax_use = r_psf + 2 * r_tol_min if r_star_max is None else r_star_max
    else:
        d_use, tol_use, rmax_use = d_star, d_tol, r_star_max

    is_star = bright & (np.abs(d - d_use) < tol_use) & (r < rmax_use)
    params = {
        "method": method,
        "d_star": float(d_use),
        "d_tol": float(tol_use),
        "r_star_max": float(rmax_use),
        "r_star": float(r_fit),
        "n_locus": n_locus,
        "n_stars": int(is_star.sum()),
        "d_psf_expected": float(d_psf),
        "r_psf_expected": float(r_psf),
    }
    return is_star, params


def apply_cuts(
    det,
    image_shape: tuple[int, int],
    bad: np.ndarray | None = None,
    ivar: np.ndarray | None = None,
    *,
    size: int = STAMP_SIZE,
    min_mean_ivar: float = 5e4,
    matched: np.ndarray | None = None,
    star_kwargs: dict | None = None,
) -> tuple[np.ndarray, dict]:
    """Compute the selection flags for a detection table.

    Parameters
    ----------
    det : table/dict with ``x``, ``y`` (pixels), ``mag``, ``mu_max``, ``flux_radius`` (pixels)
        as produced by :func:`wlshear.clash.detection.detect_sources`.
    image_shape : (ny, nx) of the total image.
    bad : (ny, nx) bool bad-pixel mask (None = no bad pixels).
    ivar : (ny, nx) inverse variance (None = skip the ivar cut).
    size : stamp side (32 px). min_mean_ivar : threshold of the mean ivar in the stamp box.
    matched : optional bool array (from ``match_catalogue``); False sets CUT_UNMATCHED.
    star_kwargs : keyword overrides for :func:`classify_stars`.

    Returns
    -------
    flags : (N,) int64 bit field (module docstring); 0 = selected.
    summary : dict with ``n_total``, ``n_selected``, the number of sources with each bit set
        (``n_edge``, ...), ``n_only_<cut>`` (removed by that cut alone) and ``star_params``.
    """
    x = np.asarray(det["x"], dtype=np.float64)
    y = np.asarray(det["y"], dtype=np.float64)
    mag = np.asarray(det["mag"], dtype=np.float64)
    mu = np.asarray(det["mu_max"], dtype=np.float64)
    r = np.asarray(det["flux_radius"], dtype=np.float64)
    n = x.size
    flags = np.zeros(n, dtype=np.int64)

    inside = stamp_inside(x, y, image_shape, size)
    flags[~inside] |= CUT_EDGE
    idx = np.flatnonzero(inside)
    x0, y0 = stamp_origin(x[idx], y[idx], size)
    if bad is not None:
        bad = np.asarray(bad, dtype=bool)
        if bad.shape != tuple(image_shape):
            raise ValueError(f"apply_cuts: bad mask shape {bad.shape} != image_shape {tuple(image_shape)}")
        nbad = _box_sums(bad.astype(np.float64), x0, y0, size)
        flags[idx[nbad > 0]] |= CUT_BAD_PIXELS
    if ivar is not None:
        ivar = np.asarray(ivar, dtype=np.float64)
        if ivar.shape != tuple(image_shape):
            raise ValueError(f"apply_cuts: ivar shape {ivar.shape} != image_shape {tuple(image_shape)}")
        mean_ivar = _box_sums(np.where(np.isfinite(ivar), ivar, 0.0), x0, y0, size) / size**2
        flags[idx[mean_ivar < min_mean_ivar]] |= CUT_LOW_IVAR

    flux = np.asarray(det["flux"], dtype=np.float64) if "flux" in _names(det) else np.ones(n)
    phot_bad = ~(np.isfinite(mag) & np.isfinite(mu) & np.isfinite(r) & (r > 0) & (flux > 0))
    flags[phot_bad] |= CUT_PHOTOMETRY
    is_star, star_params = classify_stars(mag, mu, r, **(star_kwargs or {}))
    flags[is_star] |= CUT_STAR
    if matched is not None:
        matched = np.asarray(matched, dtype=bool)
        if matched.shape != (n,):
            raise ValueError(f"apply_cuts: matched has shape {matched.shape}, expected ({n},)")
        flags[~matched] |= CUT_UNMATCHED

    summary = {"n_total": int(n), "n_selected": int((flags == 0).sum())}
    for bit, name in CUT_NAMES.items():
        summary[f"n_{name}"] = int(((flags & bit) != 0).sum())
        summary[f"n_only_{name}"] = int((flags == bit).sum())
    summary["star_params"] = star_params
    return flags, summary


def _names(det):
    try:
        return det.colnames
    except AttributeError:
        return list(det.keys())


def describe_flags(flags) -> list[str]:
    """Human-readable names of the bits set in each flag value."""
    return [",".join(name for bit, name in CUT_NAMES.items() if int(f) & bit) or "ok" for f in np.asarray(flags)]
