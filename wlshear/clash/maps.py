"""Gaussian-kernel shear maps, bootstrap noise maps, sampling, FITS output and whisker plots.

Map definition (CLASH analysis): on a grid of cells of 0.65" (10 px at 0.065"/px)

    map(r) = sum_i K(r - x_i) g_i / sum_i K(r - x_i),   K(d) = exp(-|d|^2 / (2 lambda^2)),

i.e. (K * sum g) / (K * count); ``lambda`` is the Gaussian standard deviation (default 19.5";
6.5", 13", 26" also used). The sums are computed *exactly* over galaxies (no binning): the
Gaussian is separable, so for a grid ``sum_i Ky[cy, i] Kx[cx, i] w_i`` is a matrix product
``(Ky * w) @ Kx.T`` (cost N * ny * nx, done in blocks of galaxies). Cells with zero kernel weight
(only possible far from every galaxy for small lambda) are NaN.

Grid geometry: cell (j, i) (row j, column i) covers image pixels ``[i*step, (i+1)*step)`` in x and
likewise in y, so its centre is at image pixel ``(i*step + (step-1)/2, j*step + (step-1)/2)``
(0-indexed), the geometry :func:`map_wcs` encodes in the FITS output (the same as astropy's
``wcs[::step, ::step]`` for CDELT-based headers).

All positions are image pixels (x = column, y = row); shears follow docs/CONVENTIONS.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits
from scipy import ndimage

from wlshear.sim.constants import PIXEL_SCALE

DEFAULT_SCALES_ARCSEC = (6.5, 13.0, 19.5, 26.0)
_BLOCK = 2048  # galaxies per block in the kernel sums


@dataclass(frozen=True)
class MapGrid:
    """Map grid: ``ny x nx`` cells of ``step`` image pixels (see module docstring)."""

    nx: int
    ny: int
    step: int = 10

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ny, self.nx)

    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Image-pixel coordinates of the cell centres: (xc (nx,), yc (ny,))."""
        off = (self.step - 1) / 2.0
        return np.arange(self.nx) * self.step + off, np.arange(self.ny) * self.step + off

    def to_cell(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Fractional cell indices (u, v) of image-pixel positions (cell centres are integers)."""
        off = (self.step - 1) / 2.0
        return (np.asarray(x, dtype=np.float64) - off) / self.step, (np.asarray(y, dtype=np.float64) - off) / self.step


def make_grid(image_shape: tuple[int, int], cell_arcsec: float = 0.65, pixel_scale: float = PIXEL_SCALE) -> MapGrid:
    """Grid of ``cell_arcsec`` cells covering an image of ``image_shape`` = (ny, nx) pixels.

    The cell size must be an integer number of pixels (0.65" / 0.065" = 10).
    """
    step_f = cell_arcsec / pixel_scale
    step = int(round(step_f))
    if step < 1 or abs(step - step_f) > 1e-6 * max(1.0, step_f):
        raise ValueError(
            f"make_grid: cell {cell_arcsec}\" is {step_f:.4f} px at {pixel_scale}\"/px; it must be a "
            "whole number of pixels"
        )
    ny, nx = image_shape
    return MapGrid(nx=int(math.ceil(nx / step)), ny=int(math.ceil(ny / step)), step=step)


def _as_2d(g) -> tuple[np.ndarray, bool]:
    g = np.asarray(g, dtype=np.float64)
    if g.ndim == 1:
        return g[:, None], True
    if g.ndim != 2:
        raise ValueError(f"shear values must be (N,) or (N, k), got shape {g.shape}")
    return g, False


def _check_xy(x, y, n=None):
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or (n is not None and x.size != n):
        raise ValueError(f"positions x {x.shape}, y {y.shape} do not match the {n} shear values")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("positions contain NaN/inf; remove failed galaxies before mapping")
    return x, y


def _grid_sums(x, y, w: np.ndarray, grid: MapGrid, scale_px: float) -> np.ndarray:
    """sum_i K(cell - x_i) w[i, j] for every column j of w: returns (m, ny, nx).

    Uses the separable kernel: for a block of galaxies, the (m * ny, b) array Ky * w_j stacked
    over j times Kx^T (b, nx) gives all m maps in one matrix product.
    """
    xc, yc = grid.centers()
    m = w.shape[1]
    out = np.zeros((m * grid.ny, grid.nx))
    inv = -0.5 / scale_px**2
    # keep the (m * ny, block) temporary below ~64 MB
    block = int(max(64, min(_BLOCK, 8_000_000 // max(1, m * grid.ny))))
    for s in range(0, x.size, block):
        sl = slice(s, s + block)
        kx = np.exp(inv * (xc[:, None] - x[None, sl]) ** 2)  # (nx, b)
        ky = np.exp(inv * (yc[:, None] - y[None, sl]) ** 2)  # (ny, b)
        out += (ky[None, :, :] * w[sl].T[:, None, :]).reshape(m * grid.ny, -1) @ kx.T
    return out.reshape(m, grid.ny, grid.nx)


def _point_sums(x, y, w: np.ndarray, xq, yq, scale_px: float) -> np.ndarray:
    """sum_i K(q - x_i) w[i, j] at query points: returns (M, m)."""
    out = np.zeros((xq.size, w.shape[1]))
    inv = -0.5 / scale_px**2
    for s in range(0, xq.size, _BLOCK):
        sl = slice(s, s + _BLOCK)
        k = np.exp(inv * ((xq[sl, None] - x[None, :]) ** 2 + (yq[sl, None] - y[None, :]) ** 2))
        out[sl] = k @ w
    return out


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def shear_map(
    x,
    y,
    g,
    grid: MapGrid,
    scale_arcsec: float = 19.5,
    pixel_scale: float = PIXEL_SCALE,
    weights=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-smoothed shear map on ``grid``.

    Parameters
    ----------
    x, y : (N,) galaxy positions in image pixels.
    g : (N,) or (N, k) per-galaxy values, e.g. (N, 2) for (g1, g2).
    grid : :class:`MapGrid`; scale_arcsec : kernel sigma lambda in arcsec.
    weights : optional (N,) per-galaxy weights (default 1; bootstrap multiplicities fit here).

    Returns
    -------
    maps : (k, ny, nx) (or (ny, nx) for 1-D ``g``) smoothed values, NaN where no kernel weight.
    density : (ny, nx) kernel-weighted count ``K * count`` (galaxies, unnormalised kernel).
    """
    g2, squeeze = _as_2d(g)
    x, y = _check_xy(x, y, g2.shape[0])
    w = np.ones(x.size) if weights is None else np.asarray(weights, dtype=np.float64)
    scale_px = scale_arcsec / pixel_scale
    sums = _grid_sums(x, y, np.column_stack([w, w[:, None] * g2]), grid, scale_px)
    maps = _ratio(sums[1:], sums[0][None])
    return (maps[0] if squeeze else maps), sums[0]


def shear_maps(x, y, g, grid: MapGrid, scales_arcsec: Sequence[float] = DEFAULT_SCALES_ARCSEC, pixel_scale: float = PIXEL_SCALE) -> dict:
    """:func:`shear_map` for several kernel scales: ``{scale_arcsec: (maps, density)}``."""
    return {float(s): shear_map(x, y, g, grid, s, pixel_scale) for s in scales_arcsec}


def smooth_at(x, y, g, xq, yq, scale_arcsec: float = 19.5, pixel_scale: float = PIXEL_SCALE, weights=None) -> np.ndarray:
    """The same kernel estimate evaluated exactly at arbitrary query positions (xq, yq) [px].

    Returns (M, k) (or (M,) for 1-D ``g``); NaN where the kernel weight is zero.
    """
    g2, squeeze = _as_2d(g)
    x, y = _check_xy(x, y, g2.shape[0])
    xq, yq = _check_xy(xq, yq)
    w = np.ones(x.size) if weights is None else np.asarray(weights, dtype=np.float64)
    sums = _point_sums(x, y, np.column_stack([w, w[:, None] * g2]), xq, yq, scale_arcsec / pixel_scale)
    vals = _ratio(sums[:, 1:], sums[:, :1])
    return vals[:, 0] if squeeze else vals


def kernel_count_at(x, y, xq, yq, scale_arcsec: float = 19.5, pixel_scale: float = PIXEL_SCALE) -> np.ndarray:
    """Kernel-weighted galaxy count ``sum_i K(q - x_i)`` (unnormalised Gaussian kernel, as the maps'
    ``DENSITY``) at query positions [px]: (M,)."""
    x, y = _check_xy(x, y)
    xq, yq = _check_xy(xq, yq)
    return _point_sums(x, y, np.ones((x.size, 1)), xq, yq, scale_arcsec / pixel_scale)[:, 0]


def bootstrap_indices(n: int, n_boot: int = 100, rng=None) -> np.ndarray:
    """(n_boot, n) resampling-with-replacement index sets. Pass the same sets to
    :func:`bootstrap_maps` for two estimators to get their bootstrap covariance."""
    rng = np.random.default_rng(rng)
    return rng.integers(0, n, size=(n_boot, n))


def _boot_counts(n, n_boot, rng, index_sets):
    if index_sets is None:
        index_sets = bootstrap_indices(n, n_boot, rng)
    index_sets = np.asarray(index_sets)
    if index_sets.ndim != 2 or (index_sets.size and (index_sets.min() < 0 or index_sets.max() >= n)):
        raise ValueError(f"index_sets must be (n_boot, m) integers in [0, {n}); got shape {index_sets.shape}")
    return np.stack([np.bincount(ix, minlength=n) for ix in index_sets]).astype(np.float64)


def bootstrap_maps(
    x,
    y,
    g,
    grid: MapGrid,
    scale_arcsec: float = 19.5,
    n_boot: int = 100,
    rng=None,
    index_sets=None,
    pixel_scale: float = PIXEL_SCALE,
    return_samples: bool = False,
):
    """Bootstrap noise maps: resample galaxies with replacement and recompute the map.

    Parameters
    ----------
    x, y, g, grid, scale_arcsec : as :func:`shear_map`.
    n_boot : number of resamples (ignored when ``index_sets`` is given).
    rng : seed or ``numpy.random.Generator``.
    index_sets : optional (n_boot, N) resample indices from :func:`bootstrap_indices`; use the
        same sets for two estimators of the same galaxies so that their covariance is
        ``bootstrap_covariance(samples_a, samples_b)``.
    return_samples : also return the (n_boot, k, ny, nx) float32 resampled maps.

    Returns
    -------
    sigma : (k, ny, nx) (or (ny, nx) for 1-D g) standard deviation over resamples [, samples].
    """
    g2, squeeze = _as_2d(g)
    x, y = _check_xy(x, y, g2.shape[0])
    counts = _boot_counts(x.size, n_boot, rng, index_sets)
    k = g2.shape[1]
    scale_px = scale_arcsec / pixel_scale
    nb = counts.shape[0]
    samples = np.empty((nb, k, grid.ny, grid.nx), dtype=np.float32)
    chunk = 16  # resamples per batched kernel sum
    for b0 in range(0, nb, chunk):
        c = counts[b0 : b0 + chunk]  # (nc, N)
        w = np.concatenate([c.T[:, :, None], c.T[:, :, None] * g2[:, None, :]], axis=2)  # (N, nc, k+1)
        sums = _grid_sums(x, y, w.reshape(x.size, -1), grid, scale_px).reshape(c.shape[0], k + 1, grid.ny, grid.nx)
        samples[b0 : b0 + c.shape[0]] = _ratio(sums[:, 1:], sums[:, :1])
    sigma = np.nanstd(samples.astype(np.float64), axis=0, ddof=1)
    if squeeze:
        sigma, samples = sigma[0], samples[:, 0]
    return (sigma, samples) if return_samples else sigma


def bootstrap_at(
    x, y, g, xq, yq, scale_arcsec: float = 19.5, n_boot: int = 100, rng=None, index_sets=None, pixel_scale: float = PIXEL_SCALE
) -> np.ndarray:
    """Bootstrap resamples of :func:`smooth_at` at query points: returns (n_boot, M, k)."""
    g2, _ = _as_2d(g)
    x, y = _check_xy(x, y, g2.shape[0])
    xq, yq = _check_xy(xq, yq)
    counts = _boot_counts(x.size, n_boot, rng, index_sets)
    k = g2.shape[1]
    nb = counts.shape[0]
    # columns: [c_b, c_b * g_1, ..., c_b * g_k] for every resample b
    w = np.concatenate([counts.T[:, :, None], counts.T[:, :, None] * g2[:, None, :]], axis=2)  # (N, nb, k+1)
    sums = _point_sums(x, y, w.reshape(x.size, nb * (k + 1)), xq, yq, scale_arcsec / pixel_scale)
    sums = sums.reshape(xq.size, nb, k + 1)
    vals = _ratio(sums[:, :, 1:], sums[:, :, :1])  # (M, nb, k)
    return np.transpose(vals, (1, 0, 2))


def bootstrap_covariance(samples_a: np.ndarray, samples_b: np.ndarray) -> np.ndarray:
    """Per-element covariance over axis 0 of two bootstrap sample stacks made with the same
    index sets (e.g. CNN and baseline maps)."""
    a = np.asarray(samples_a, dtype=np.float64)
    b = np.asarray(samples_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"bootstrap_covariance: shapes differ {a.shape} vs {b.shape}")
    return np.nanmean((a - np.nanmean(a, 0)) * (b - np.nanmean(b, 0)), axis=0) * a.shape[0] / (a.shape[0] - 1)


def map_at(maps: np.ndarray, grid: MapGrid, x, y, order: int = 1) -> np.ndarray:
    """Interpolate map(s) at image-pixel positions (x, y).

    ``maps`` is (ny, nx) or (k, ny, nx); returns (M,) or (k, M). ``order`` is the spline order
    of ``scipy.ndimage.map_coordinates`` (1 = bilinear between cell centres). Positions beyond the
    outermost cell centres take the nearest edge value. NaN cells propagate.
    """
    maps = np.asarray(maps, dtype=np.float64)
    squeeze = maps.ndim == 2
    m3 = maps[None] if squeeze else maps
    if m3.shape[1:] != grid.shape:
        raise ValueError(f"map_at: map shape {m3.shape[1:]} does not match grid {grid.shape}")
    u, v = grid.to_cell(np.ravel(x), np.ravel(y))
    out = np.stack([ndimage.map_coordinates(m, [v, u], order=order, mode="nearest") for m in m3])
    return out[0] if squeeze else out


def map_wcs(image_wcs, grid: MapGrid):
    """Celestial WCS of the map grid derived from the image WCS.

    Map pixel q (0-indexed) is image pixel ``step * q + (step - 1) / 2``, so in FITS terms the
    linear transform (CD, or CDELT with PC) is multiplied by ``step`` and
    ``CRPIX_map = (CRPIX_image + (step - 1) / 2) / step``. (This equals astropy's
    ``wcs[::step, ::step]`` for CDELT/PC headers; astropy's slicing does not rescale a CD matrix,
    hence the explicit construction.) SIP distortion terms, if any, are dropped with a warning
    (CLASH drizzled mosaics have none).
    """
    import copy
    import warnings

    wcs = copy.deepcopy(image_wcs.celestial)
    s = float(grid.step)
    if wcs.sip is not None or wcs.cpdis1 is not None or wcs.det2im1 is not None:
        warnings.warn("map_wcs: dropping distortion terms of the image WCS for the map grid", UserWarning, stacklevel=2)
        wcs.sip = None
        wcs.cpdis1 = wcs.cpdis2 = None
        wcs.det2im1 = wcs.det2im2 = None
    wcs.wcs.crpix = (np.asarray(wcs.wcs.crpix, dtype=np.float64) + (s - 1) / 2) / s
    if wcs.wcs.has_cd():
        wcs.wcs.cd = np.asarray(wcs.wcs.cd, dtype=np.float64) * s
    else:
        wcs.wcs.cdelt = np.asarray(wcs.wcs.cdelt, dtype=np.float64) * s
    wcs.pixel_shape = (grid.nx, grid.ny)
    wcs.wcs.set()
    return wcs


def write_map_fits(path: str | Path, maps: dict, grid: MapGrid, image_wcs=None, meta: dict | None = None) -> Path:
    """Write named 2-D maps (``{"G1": ..., "G2": ..., "SIGMA_G1": ...}``) to one FITS file.

    Each map becomes an image extension with that EXTNAME and the grid WCS (if ``image_wcs`` is
    given); ``meta`` items (e.g. ``{"LAMBDA": 19.5, "CLUSTER": "a383"}``) go into every header.
    """
    hdr0 = fits.Header()
    if image_wcs is not None:
        hdr0.update(map_wcs(image_wcs, grid).to_header())
    hdr0["CELLPIX"] = (grid.step, "image pixels per map cell")
    for key, val in (meta or {}).items():
        hdr0[str(key)[:8].upper()] = val
    hdus = [fits.PrimaryHDU()]
    for name, arr in maps.items():
        arr = np.asarray(arr, dtype=np.float32)
        if arr.shape != grid.shape:
            raise ValueError(f"write_map_fits: map {name!r} has shape {arr.shape}, grid is {grid.shape}")
        hdus.append(fits.ImageHDU(arr, header=hdr0.copy(), name=str(name).upper()))
    path = Path(path)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path
