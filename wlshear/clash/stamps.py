"""Cut 32x32 postage stamps around detected sources.

Geometry (docs/CONVENTIONS.md): pixel centres sit at integer 0-indexed coordinates (the ``sep``
convention). A stamp of even size S (default 32) has its centre at stamp pixel
((S-1)/2, (S-1)/2) = (15.5, 15.5), between the four central pixels. Stamps are cut with integer
offsets only (no resampling), so the stamp's first column is ``x0 = floor(x - (S-1)/2 + 0.5)``
and the source then sits at stamp position ``15.5 + dx`` with the residual

    dx = x - (x0 + 15.5)  in  [-0.5, 0.5)   (same for y)

which is returned so that it can be applied to a model or simulation if needed. A source whose
catalogue position is exactly a pixel centre always has |dx| = 0.5, the best an even-size stamp
can do without interpolation.
"""

from __future__ import annotations

import numpy as np

STAMP_SIZE = 32

# stamp flag bits (0 = good)
STAMP_EDGE = 1  # stamp box not fully inside the image: stamp is all NaN
STAMP_NONFINITE = 2  # stamp contains NaN/inf pixels
STAMP_EMPTY = 4  # stamp is identically zero (e.g. masked region)


def stamp_origin(x, y, size: int = STAMP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Integer (x0, y0) of the first stamp column/row so the source lands nearest (S-1)/2."""
    half = (size - 1) / 2.0
    x0 = np.floor(np.asarray(x, dtype=np.float64) - half + 0.5).astype(np.int64)
    y0 = np.floor(np.asarray(y, dtype=np.float64) - half + 0.5).astype(np.int64)
    return x0, y0


def stamp_inside(x, y, shape: tuple[int, int], size: int = STAMP_SIZE) -> np.ndarray:
    """True where the size x size stamp box around (x, y) lies fully inside an image of ``shape``.

    Non-finite positions count as outside.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x0, y0 = stamp_origin(np.where(finite, x, 0), np.where(finite, y, 0), size)
    ny, nx = shape
    return finite & (x0 >= 0) & (y0 >= 0) & (x0 + size <= nx) & (y0 + size <= ny)


def extract_stamps(image: np.ndarray, x, y, size: int = STAMP_SIZE):
    """Extract (N, size, size) float32 stamps centred on pixel positions (x, y).

    Parameters
    ----------
    image : (ny, nx) image, axis 0 = y.
    x, y : (N,) 0-indexed pixel positions of the sources (sep convention).
    size : stamp side in pixels (32).

    Returns
    -------
    stamps : (N, size, size) float32; all-NaN for sources whose box leaves the image.
    offsets : (N, 2) float64 residual (dx, dy): the source is at stamp pixel
        ((size-1)/2 + dx, (size-1)/2 + dy); NaN for edge sources.
    flags : (N,) int bit field, 0 = good; bits STAMP_EDGE, STAMP_NONFINITE, STAMP_EMPTY.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"extract_stamps: image must be 2-D, got shape {image.shape}")
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"extract_stamps: x and y must be 1-D of equal length ({x.shape}, {y.shape})")
    n = x.size
    stamps = np.full((n, size, size), np.nan, dtype=np.float32)
    offsets = np.full((n, 2), np.nan, dtype=np.float64)
    flags = np.zeros(n, dtype=np.int64)
    inside = stamp_inside(x, y, image.shape, size)
    flags[~inside] |= STAMP_EDGE
    idx = np.flatnonzero(inside)
    if idx.size:
        x0, y0 = stamp_origin(x[idx], y[idx], size)
        ar = np.arange(size)
        rows = (y0[:, None] + ar)[:, :, None]
        cols = (x0[:, None] + ar)[:, None, :]
        block = 4096  # limit the temporary index arrays
        for s in range(0, idx.size, block):
            sl = slice(s, s + block)
            stamps[idx[sl]] = image[rows[sl], cols[sl]]
        half = (size - 1) / 2.0
        offsets[idx, 0] = x[idx] - (x0 + half)
        offsets[idx, 1] = y[idx] - (y0 + half)
        sub = stamps[idx]
        nonfinite = ~np.isfinite(sub).all(axis=(1, 2))
        empty = ~nonfinite & (sub == 0).all(axis=(1, 2))
        flags[idx[nonfinite]] |= STAMP_NONFINITE
        flags[idx[empty]] |= STAMP_EMPTY
    return stamps, offsets, flags
