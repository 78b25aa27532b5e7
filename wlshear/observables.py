"""Measured galaxy observables of stamps: half-light radius, aperture flux, magnitude and S/N.

A leaf of the package (it imports only :mod:`wlshear.sim.constants`): the models (calibration
surfaces), the calibration fits, the baselines (moments weight width) and the metrics (conditional
bias bins) all measure galaxies through these functions.

All functions work on stamps following ``docs/CONVENTIONS.md``: arrays ``(32, 32)`` or
``(N, 32, 32)`` with axis 0 = y (row), axis 1 = x (column), pixel values in CLASH counts, and the
galaxy centre at the 0-indexed pixel position (x, y) = (15.5, 15.5) for a 32 px stamp (in general
``((nx - 1) / 2, (ny - 1) / 2)``). Radii are in pixels (0.065 arcsec each).

These observables are used to bin shear-estimation results by *measured* quantities, to evaluate
calibration surfaces m(observables), and the half-light radius sets the weight width of the
moments baseline.
"""

from __future__ import annotations

import numpy as np

from wlshear.sim.constants import ZP_CLASH

__all__ = [
    "as_stamp_batch",
    "stamp_radii",
    "half_light_radius",
    "aperture_flux",
    "measure_observables",
]

#: Default aperture radius in pixels: the largest circle inscribed in a 32 px stamp.
DEFAULT_APERTURE_RADIUS = 15.5


def as_stamp_batch(stamps, name: str = "stamps") -> np.ndarray:
    """Return ``stamps`` as a float64 ``(N, ny, nx)`` array (a single 2-D stamp becomes N = 1).

    Raises ``ValueError`` when the input is not 2-D or 3-D.
    """
    arr = np.asarray(stamps, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(
            f"{name} must have shape (N, ny, nx) or (ny, nx) with axis order (y, x); "
            f"got shape {np.shape(stamps)}"
        )
    return arr


def stamp_radii(ny: int, nx: int, center: tuple[float, float] | None = None):
    """Pixel offsets and radii about the stamp centre.

    Parameters
    ----------
    ny, nx : stamp shape (rows, columns).
    center : (x, y) centre in 0-indexed pixel coordinates; default ``((nx-1)/2, (ny-1)/2)``,
        i.e. (15.5, 15.5) for a 32 px stamp.

    Returns
    -------
    dx, dy, r : arrays ``(ny, nx)`` of x (column) offset, y (row) offset and radius, in pixels.
    """
    if center is None:
        center = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    cx, cy = center
    dy, dx = np.meshgrid(np.arange(ny) - cy, np.arange(nx) - cx, indexing="ij")
    return dx, dy, np.hypot(dx, dy)


def half_light_radius(
    stamp,
    r_max: float = DEFAULT_APERTURE_RADIUS,
    center: tuple[float, float] | None = None,
    min_radius: float = 0.5,
):
    """Half-light radius in pixels from the curve of growth about the stamp centre.

    The total flux is the sum of pixel values within radius ``r_max`` of the centre. Pixels are
    accumulated in order of increasing radius; the half-light radius is the first radius where the
    cumulative flux reaches half the total, linearly interpolated between the two bracketing
    radii. Using the *first* crossing keeps the result stable when noise (or negative pixels)
    makes the curve of growth non-monotonic.

    Parameters
    ----------
    stamp : ``(ny, nx)`` or ``(N, ny, nx)`` array, axis order (y, x), counts.
    r_max : aperture radius for the total flux, pixels.
    center : (x, y) 0-indexed centre; default is the stamp centre (15.5, 15.5).
    min_radius : lower clip for the returned radius (pixels), to keep a usable weight width for
        unresolved sources.

    Returns
    -------
    float (for a 2-D input) or ``(N,)`` float64 array; NaN where the total flux within ``r_max``
    is not positive or the stamp contains non-finite values.
    """
    single = np.ndim(stamp) == 2
    arr = as_stamp_batch(stamp, "stamp")
    n, ny, nx = arr.shape
    _, _, r = stamp_radii(ny, nx, center)
    r = r.ravel()
    inside = r <= r_max
    order = np.argsort(r[inside], kind="stable")
    r_sorted = r[inside][order]
    # group pixels at identical radius (ties) so that interpolation is between distinct radii
    r_unique, last_idx = np.unique(r_sorted[::-1], return_index=True)
    last_idx = len(r_sorted) - 1 - last_idx  # index of the last pixel at each unique radius

    flat = arr.reshape(n, -1)[:, inside][:, order]
    finite = np.all(np.isfinite(flat), axis=1)
    flat = np.where(np.isfinite(flat), flat, 0.0)
    cum_all = np.cumsum(flat, axis=1)[:, last_idx]  # flux out to and including each radius
    # A pixel centred at radius r straddles r, so about half of its flux lies inside r: place the
    # curve-of-growth point at r_k midway between the flux enclosed before and after ring k.
    prev = np.concatenate([np.zeros((n, 1)), cum_all[:, :-1]], axis=1)
    cum = 0.5 * (prev + cum_all)
    cum[:, -1] = cum_all[:, -1]  # total flux inside r_max
    total = cum[:, -1]
    half = 0.5 * total
    ok = finite & (total > 0)

    reached = cum >= half[:, None]
    k = np.argmax(reached, axis=1)  # first unique radius where half the flux is enclosed
    # interpolate between radius k-1 (or 0 with zero flux) and radius k
    r_hi = r_unique[k]
    c_hi = cum[np.arange(n), k]
    r_lo = np.where(k > 0, r_unique[np.maximum(k - 1, 0)], 0.0)
    c_lo = np.where(k > 0, cum[np.arange(n), np.maximum(k - 1, 0)], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(c_hi > c_lo, (half - c_lo) / (c_hi - c_lo), 1.0)
    frac = np.clip(frac, 0.0, 1.0)
    hlr = r_lo + frac * (r_hi - r_lo)
    hlr = np.maximum(hlr, min_radius)
    hlr = np.where(ok, hlr, np.nan)
    return float(hlr[0]) if single else hlr


def aperture_flux(
    stamps,
    radius: float = DEFAULT_APERTURE_RADIUS,
    center: tuple[float, float] | None = None,
):
    """Sum of pixel values (counts) within a circular aperture of ``radius`` pixels.

    Returns ``(N,)`` float64 (a float for a 2-D input); NaN for stamps with non-finite pixels.
    """
    single = np.ndim(stamps) == 2
    arr = as_stamp_batch(stamps)
    _, _, r = stamp_radii(arr.shape[1], arr.shape[2], center)
    mask = r <= radius
    flux = arr[:, mask].sum(axis=1)
    return float(flux[0]) if single else flux


def _aperture_noise_sigma(mask: np.ndarray, noise_sigma: float | None, noise_kernel) -> float:
    """Standard deviation (counts) of the aperture sum under the given background noise model.

    With ``noise_kernel`` K (correlated noise = iid N(0,1) convolved with K, as in the
    simulations), the aperture sum is sum_p A(p) (K * n)(p) = sum_q (A correlated with K)(q) n(q),
    so its variance is the squared norm of the correlation of the aperture mask with K. Otherwise
    white noise of ``noise_sigma`` per pixel gives ``noise_sigma * sqrt(n_pix)``.
    """
    if noise_kernel is not None:
        from scipy.signal import correlate2d

        k = np.asarray(noise_kernel, dtype=np.float64)
        ak = correlate2d(mask.astype(np.float64), k, mode="full")
        return float(np.sqrt(np.sum(ak**2)))
    return float(noise_sigma) * float(np.sqrt(mask.sum()))


def measure_observables(
    stamps,
    zeropoint: float = ZP_CLASH,
    noise_sigma: float | None = None,
    noise_kernel=None,
    aperture_radius: float = DEFAULT_APERTURE_RADIUS,
    center: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Measured observables of each stamp, for binning results by measured quantities.

    Parameters
    ----------
    stamps : ``(N, ny, nx)`` (or ``(ny, nx)``) array in counts, axis order (y, x).
    zeropoint : magnitude zero-point: mag = zeropoint - 2.5 log10(flux). Default CLASH 25.4193.
    noise_sigma : per-pixel background noise sigma (counts), treated as white noise. If None and
        ``noise_kernel`` is None, it is estimated per stamp from the stamp's border pixels (outer
        2 px) with a MAD estimator, which assumes those pixels are mostly sky.
    noise_kernel : optional 2-D kernel K such that the noise is iid N(0,1) convolved with K (e.g.
        the 7x7 CLASH kernel); overrides ``noise_sigma`` and accounts for noise correlations in
        the aperture-sum variance.
    aperture_radius : aperture radius in pixels for flux and S/N (default 15.5 = whole stamp's
        inscribed circle).
    center : (x, y) 0-indexed centre, default stamp centre.

    Returns
    -------
    dict of ``(N,)`` float64 arrays:
        ``flux`` aperture flux (counts), ``mag`` AB magnitude (NaN where flux <= 0), ``hlr_px``
        half-light radius in pixels (:func:`half_light_radius`), ``snr`` = flux / sigma(flux).
    """
    arr = as_stamp_batch(stamps)
    n, ny, nx = arr.shape
    _, _, r = stamp_radii(ny, nx, center)
    mask = r <= aperture_radius
    flux = arr[:, mask].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(flux > 0, zeropoint - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
    hlr = half_light_radius(arr, r_max=aperture_radius, center=center)

    if noise_kernel is not None or noise_sigma is not None:
        sig_flux = np.full(n, _aperture_noise_sigma(mask, noise_sigma, noise_kernel))
    else:
        border = np.ones((ny, nx), dtype=bool)
        border[2:-2, 2:-2] = False
        b = arr[:, border]
        mad = np.median(np.abs(b - np.median(b, axis=1, keepdims=True)), axis=1)
        sig_pix = 1.4826 * mad
        sig_flux = sig_pix * np.sqrt(mask.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(sig_flux > 0, flux / sig_flux, np.nan)
    return {"flux": flux, "mag": mag, "hlr_px": hlr, "snr": snr}
