"""Source detection and photometry on the total (filter-combined) image with ``sep``.

SExtractor-like settings of the CLASH analysis: minimum area 9 px, threshold 1 sigma of the
per-pixel error ``1/sqrt(ivar)``, 32 deblending levels, minimum contrast 0.0015, background
estimated with ``sep.Background`` (bad pixels masked) and subtracted.

Output columns (astropy Table, one row per detection):

=============  =============================================================================
``x``, ``y``    0-indexed pixel centroid (sep convention: pixel centres at integers)
``ra``, ``dec`` degrees, from the WCS (NaN if no WCS given)
``flux``        Kron ("AUTO") flux in image counts (k = 2.5, minimum radius 3.5); falls back
                to the isophotal flux where the Kron aperture fails (bit 512 in ``flags``)
``flux_err``    error of ``flux`` from the ivar map
``flux_iso``    isophotal flux (sum of pixels above threshold)
``mag``         ``zeropoint - 2.5 log10(flux)`` (NaN for flux <= 0)
``flux_radius`` half-light radius in pixels (``sep.flux_radius`` with fraction 0.5, normalised
                to ``flux``)
``peak``        peak background-subtracted pixel value (counts)
``mu_max``      peak surface brightness, ``zeropoint - 2.5 log10(peak / pixel_scale**2)``
                in mag/arcsec^2 (NaN for peak <= 0)
``a``, ``b``, ``theta``, ``npix``  sep isophotal shape parameters (pixels, radians)
``flags``       sep extraction/photometry flags (see sep documentation) plus 512 = Kron failed
=============  =============================================================================
"""

from __future__ import annotations

import numpy as np
import sep
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from wlshear.sim.constants import PIXEL_SCALE, ZP_CLASH

FLAG_KRON_FAILED = 512


def _native(a) -> np.ndarray:
    """C-contiguous, native byte order float64 copy/view (sep rejects big-endian FITS data)."""
    return np.ascontiguousarray(np.asarray(a), dtype=np.float64)


def flux_to_mag(flux, zeropoint: float = ZP_CLASH) -> np.ndarray:
    flux = np.asarray(flux, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, zeropoint - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)


def detect_sources(
    image: np.ndarray,
    ivar: np.ndarray,
    bad: np.ndarray | None = None,
    wcs=None,
    *,
    thresh: float = 1.0,
    minarea: int = 9,
    deblend_nthresh: int = 32,
    deblend_cont: float = 0.0015,
    zeropoint: float = ZP_CLASH,
    pixel_scale: float = PIXEL_SCALE,
    bkg_box: int = 64,
    bkg_filter: int = 3,
    filter_kernel: np.ndarray | None = "default",
    subtract_background: bool = True,
    mask_neighbours: bool = True,
    return_segmap: bool = False,
):
    """Detect sources and measure photometry on a total image.

    Parameters
    ----------
    image : (ny, nx) total image in counts.
    ivar : (ny, nx) inverse variance (counts^-2); pixels with ivar <= 0 are masked.
    bad : optional (ny, nx) bool mask (True = bad), e.g. ``Field.bad``.
    wcs : celestial astropy WCS for ``ra``/``dec`` (optional).
    thresh : detection threshold in units of the per-pixel error 1/sqrt(ivar).
    minarea, deblend_nthresh, deblend_cont : sep/SExtractor parameters.
    zeropoint : magnitude zero point (CLASH 25.4193).
    pixel_scale : arcsec/px, for ``mu_max``.
    bkg_box, bkg_filter : sep.Background mesh size and median-filter size (pixels / meshes).
    filter_kernel : detection filter; ``"default"`` = sep's default 3x3 kernel, None = no filter.
    subtract_background : subtract the sep background before detection and photometry.
    mask_neighbours : exclude pixels of other detections from the Kron radius and flux (via the
        segmentation map); the half-light radius is measured without this masking.
    return_segmap : also return the segmentation map (int32, 0 = background, k+1 = row k).

    Returns
    -------
    Table of detections (columns in the module docstring) [, segmap].
    """
    data, err, mask = _masked_inputs(image, ivar, bad)
    if subtract_background:
        bkg = sep.Background(data, mask=mask, bw=bkg_box, bh=bkg_box, fw=bkg_filter, fh=bkg_filter)
        data = _native(data - bkg.back())
        data[mask] = 0.0
    objs, segmap = _extract(data, err, mask, thresh, minarea, deblend_nthresh, deblend_cont, filter_kernel)
    phot = _photometry(data, err, mask, objs, segmap, mask_neighbours)
    table = _detection_table(objs, phot, wcs, zeropoint, pixel_scale)
    table.meta.update(
        {"zeropoint": zeropoint, "pixel_scale": pixel_scale, "thresh": thresh, "minarea": minarea}
    )
    if return_segmap:
        return table, np.asarray(segmap, dtype=np.int32)
    return table


def _masked_inputs(image, ivar, bad):
    """(image with masked pixels 0, per-pixel error 1/sqrt(ivar) (1e30 where masked), mask)."""
    data = _native(image)
    ivar = _native(ivar)
    if data.ndim != 2 or data.shape != ivar.shape:
        raise ValueError(f"detect_sources: image {data.shape} and ivar {ivar.shape} must be equal 2-D shapes")
    mask = ~(ivar > 0) | ~np.isfinite(data) | ~np.isfinite(ivar)
    if bad is not None:
        bad = np.asarray(bad, dtype=bool)
        if bad.shape != data.shape:
            raise ValueError(f"detect_sources: bad mask shape {bad.shape} != image shape {data.shape}")
        mask |= bad
    if mask.all():
        raise ValueError("detect_sources: every pixel is masked (ivar <= 0 or bad); nothing to detect")
    data = np.where(mask, 0.0, data)
    with np.errstate(divide="ignore"):
        err = np.where(mask, 1e30, 1.0 / np.sqrt(np.where(mask, 1.0, ivar)))
    return data, _native(err), np.ascontiguousarray(mask)


def _extract(data, err, mask, thresh, minarea, deblend_nthresh, deblend_cont, filter_kernel):
    """``sep.extract`` with the segmentation map; (objects, segmap)."""
    kwargs = dict(
        thresh=thresh,
        err=err,
        mask=mask,
        minarea=minarea,
        deblend_nthresh=deblend_nthresh,
        deblend_cont=deblend_cont,
        segmentation_map=True,
    )
    if filter_kernel is None:
        kwargs["filter_kernel"] = None
    elif not isinstance(filter_kernel, str):
        kwargs["filter_kernel"] = _native(filter_kernel)
    # a 1-sigma threshold on a full mosaic needs a large pixel stack (capped to bound memory)
    sep.set_extract_pixstack(int(min(max(300_000, data.size), 20_000_000)))
    sep.set_sub_object_limit(4096)
    try:
        return sep.extract(data, **kwargs)
    except Exception as exc:
        raise RuntimeError(
            f"sep.extract failed on a {data.shape} image ({exc}); try a higher threshold or "
            "check the ivar map"
        ) from exc


def _photometry(data, err, mask, objs, segmap, mask_neighbours: bool) -> dict:
    """Kron ("AUTO") flux (isophotal where Kron fails), its error, half-light radius and flags."""
    n = len(objs)
    x = np.ascontiguousarray(objs["x"], dtype=np.float64)
    y = np.ascontiguousarray(objs["y"], dtype=np.float64)
    a = np.ascontiguousarray(objs["a"], dtype=np.float64)
    b = np.ascontiguousarray(objs["b"], dtype=np.float64)
    theta = np.ascontiguousarray(objs["theta"], dtype=np.float64)
    flags = np.asarray(objs["flag"], dtype=np.int64).copy()
    flux_iso = np.asarray(objs["flux"], dtype=np.float64)
    out = {"x": x, "y": y, "a": a, "b": b, "theta": theta, "flux_iso": flux_iso, "flux": flux_iso.copy(),
           "flux_err": np.full(n, np.nan), "radius": np.full(n, np.nan), "flags": flags}
    if not n:
        return out
    # Kron ("AUTO") photometry; sep needs strictly positive finite shapes
    a_s = np.where(np.isfinite(a) & (a > 0), a, 1.0)
    b_s = np.where(np.isfinite(b) & (b > 0), b, 1.0)
    t_s = np.clip(np.where(np.isfinite(theta), theta, 0.0), -np.pi / 2, np.pi / 2)
    seg_kw = {}
    if mask_neighbours:  # ignore pixels of other detections (SExtractor-like)
        seg_kw = {"seg_id": np.arange(1, n + 1, dtype=np.int32), "segmap": np.ascontiguousarray(segmap, dtype=np.int32)}
    kronrad, kflag = sep.kron_radius(data, x, y, a_s, b_s, t_s, 6.0, mask=mask, **seg_kw)
    kronrad = np.where(np.isfinite(kronrad) & (kronrad > 0), kronrad, 0.0)
    r_k = np.maximum(2.5 * kronrad, 3.5)
    fk, fk_err, fkflag = sep.sum_ellipse(
        data, x, y, a_s, b_s, t_s, r_k, err=err, mask=mask, subpix=1, **seg_kw
    )
    flags |= np.asarray(kflag, dtype=np.int64) | np.asarray(fkflag, dtype=np.int64)
    ok = np.isfinite(fk) & (fk > 0) & (kronrad > 0)
    flux = np.where(ok, fk, flux_iso)
    out["flux"], out["flux_err"] = flux, np.where(ok, fk_err, np.nan)
    flags[~ok] |= FLAG_KRON_FAILED
    rmax = np.maximum(6.0 * a_s, 3.0)
    norm = np.where(flux > 0, flux, np.abs(flux) + 1e-30)
    radius, rflag = sep.flux_radius(
        data, x, y, _native(rmax), 0.5, normflux=_native(norm), mask=mask, subpix=5
    )
    out["radius"] = np.asarray(radius, dtype=np.float64)
    flags |= np.asarray(rflag, dtype=np.int64)
    return out


def _detection_table(objs, phot: dict, wcs, zeropoint: float, pixel_scale: float) -> Table:
    """The output table (module docstring) of the photometry."""
    n, x, y = len(objs), phot["x"], phot["y"]
    peak = np.asarray(objs["peak"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu_max = np.where(
            peak > 0,
            zeropoint - 2.5 * np.log10(np.where(peak > 0, peak, 1.0) / pixel_scale**2),
            np.nan,
        )
    if wcs is not None and n:
        ra, dec = wcs.celestial.pixel_to_world_values(x, y)
        ra, dec = np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
    else:
        ra = np.full(n, np.nan)
        dec = np.full(n, np.nan)
    return Table(
        {
            "id": np.arange(n, dtype=np.int64),
            "x": x,
            "y": y,
            "ra": ra,
            "dec": dec,
            "flux": phot["flux"],
            "flux_err": phot["flux_err"],
            "flux_iso": phot["flux_iso"],
            "mag": flux_to_mag(phot["flux"], zeropoint),
            "flux_radius": phot["radius"],
            "peak": peak,
            "mu_max": mu_max,
            "a": phot["a"],
            "b": phot["b"],
            "theta": phot["theta"],
            "npix": np.asarray(objs["npix"], dtype=np.int64),
            "flags": phot["flags"],
        }
    )


def _coords(obj) -> SkyCoord:
    if isinstance(obj, SkyCoord):
        return obj
    try:
        names = {c.lower(): c for c in obj.colnames}
    except AttributeError:
        names = {k.lower(): k for k in obj.keys()}
    if "ra" not in names or "dec" not in names:
        raise ValueError(
            f"match_catalogue: need 'ra' and 'dec' columns in degrees (found {sorted(names.values())});"
            " read catalogues with wlshear.clash.io.read_catalogue"
        )
    ra = np.asarray(obj[names["ra"]], dtype=np.float64)
    dec = np.asarray(obj[names["dec"]], dtype=np.float64)
    return SkyCoord(ra=ra * u.deg, dec=dec * u.deg)


def match_catalogue(det, cat, radius_arcsec: float = 0.65):
    """Match each detection to its nearest catalogue entry on the sky.

    Parameters
    ----------
    det, cat : tables/dicts with ``ra``/``dec`` columns in degrees (or SkyCoord).
    radius_arcsec : maximum separation for a match (0.65" = 10 ACS pixels).

    Returns
    -------
    idx : (N_det,) int index into ``cat`` of the nearest entry (-1 where ``cat`` is empty or the
        detection has no finite position).
    sep_arcsec : (N_det,) separation in arcsec (inf where unmatched).
    matched : (N_det,) bool, ``sep_arcsec <= radius_arcsec``.
    """
    c_det = _coords(det)
    c_cat = _coords(cat)
    n = len(c_det)
    idx = np.full(n, -1, dtype=np.int64)
    sep_arcsec = np.full(n, np.inf)
    if n == 0 or len(c_cat) == 0:
        return idx, sep_arcsec, np.zeros(n, dtype=bool)
    good_det = np.isfinite(c_det.ra.deg) & np.isfinite(c_det.dec.deg)
    good_cat = np.isfinite(c_cat.ra.deg) & np.isfinite(c_cat.dec.deg)
    if good_det.any() and good_cat.any():
        cat_idx = np.flatnonzero(good_cat)
        i, d2, _ = c_det[good_det].match_to_catalog_sky(c_cat[good_cat])
        idx[good_det] = cat_idx[np.atleast_1d(i)]
        sep_arcsec[good_det] = np.atleast_1d(d2.arcsec)
    return idx, sep_arcsec, sep_arcsec <= radius_arcsec
