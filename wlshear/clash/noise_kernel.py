"""Measure the 7x7 correlated-background-noise kernel K_bg of a total image.

Model: background noise n = K (*) w with w iid N(0, 1) pixels. The covariance of a 7x7 patch
(flattened to 49 values) is then C = T T^T, T the convolution matrix of K; for a symmetric
kernel T is symmetric, so T ~ sqrtm(C) and the centre row of sqrtm(C) reshaped to 7x7 is K
(up to patch-edge effects that are small for a compact kernel). Procedure:

1. subtract a ``sep`` background (bad pixels masked);
2. detect sources (``sep``, ``detect_thresh`` sigma, min area 9) and dilate their segmentation by
   ``dilate`` pixels; also exclude bad pixels and under-exposed pixels
   (``ivar < min_ivar_frac * median(ivar > 0)`` or below ``min_ivar``);
3. collect every 7x7 patch on a grid of stride ``stride`` that contains no excluded pixel;
4. C = P^T P / N (patches are not mean-subtracted: the background is already removed);
5. K = real(sqrtm(C))[24].reshape(7, 7).

The kernel is in image counts (the same units as the image), to be used as
``noise = scipy.signal.convolve2d(N(0,1) field, K, mode="same")``.

Command line (``conf/noise_kernel.yaml``)::

    python -m wlshear.tasks.noise_kernel image=total.fits [weight=ivar.fits] out=kernel.npy

writes ``kernel.npy`` (7x7 float64) and ``kernel.txt`` (the same numbers, human-readable).
"""

from __future__ import annotations

import numpy as np
import sep
from scipy import linalg, ndimage

from .detection import _native


def extract_clean_patches(
    image: np.ndarray,
    exclude: np.ndarray,
    size: int = 7,
    stride: int = 4,
) -> np.ndarray:
    """All size x size patches on a grid of step ``stride`` free of excluded pixels: (N, size*size)."""
    ny, nx = image.shape
    excl = np.asarray(exclude, dtype=bool)
    # number of excluded pixels in each size x size window (summed-area table)
    sat = np.zeros((ny + 1, nx + 1))
    sat[1:, 1:] = np.cumsum(np.cumsum(excl, axis=0, dtype=np.float64), axis=1)
    y0 = np.arange(0, ny - size + 1, stride)
    x0 = np.arange(0, nx - size + 1, stride)
    yy, xx = np.meshgrid(y0, x0, indexing="ij")
    nbad = sat[yy + size, xx + size] - sat[yy, xx + size] - sat[yy + size, xx] + sat[yy, xx]
    yy, xx = yy[nbad == 0], xx[nbad == 0]
    ar = np.arange(size)
    rows = (yy[:, None] + ar)[:, :, None]
    cols = (xx[:, None] + ar)[:, None, :]
    return image[rows, cols].reshape(yy.size, size * size)


def kernel_from_patches(patches: np.ndarray) -> np.ndarray:
    """Centre row of real(sqrtm(C)), C = P^T P / N, reshaped to a square kernel."""
    p = np.asarray(patches, dtype=np.float64)
    n, m = p.shape
    size = int(round(np.sqrt(m)))
    if size * size != m or size % 2 == 0:
        raise ValueError(f"patches must be flattened odd squares, got {m} values per patch")
    if n < 10 * m:
        raise ValueError(f"only {n} clean patches; need >= {10 * m} for a stable {m}x{m} covariance")
    cov = p.T @ p / n
    root = linalg.sqrtm(cov)
    return np.real(root)[m // 2].reshape(size, size)


def measure_noise_kernel(
    image: np.ndarray,
    ivar: np.ndarray | None = None,
    bad: np.ndarray | None = None,
    *,
    size: int = 7,
    stride: int = 4,
    detect_thresh: float = 3.0,
    minarea: int = 9,
    dilate: int = 5,
    min_ivar: float | None = None,
    min_ivar_frac: float = 0.5,
    bkg_box: int = 64,
    return_info: bool = False,
):
    """Measure the size x size noise kernel (module docstring) of an image.

    Parameters
    ----------
    image : (ny, nx) total image (counts).
    ivar : optional inverse variance; pixels with ivar <= 0, below ``min_ivar`` or below
        ``min_ivar_frac`` x the median positive ivar are excluded. Without ivar, detection uses
        the global background RMS.
    bad : optional bool mask of bad pixels.
    size, stride : patch size (7) and patch grid step (patches may overlap if stride < size).
    detect_thresh, minarea, dilate : source masking (sigma, pixels, dilation iterations).

    Returns
    -------
    kernel : (size, size) float64 [, info dict with ``n_patches``, ``frac_excluded``, ``rms``].
    """
    data = _native(image)
    if data.ndim != 2:
        raise ValueError(f"measure_noise_kernel: image must be 2-D, got {data.shape}")
    mask = ~np.isfinite(data)
    if bad is not None:
        mask |= np.asarray(bad, dtype=bool)
    err = None
    if ivar is not None:
        iv = _native(ivar)
        if iv.shape != data.shape:
            raise ValueError(f"ivar shape {iv.shape} != image shape {data.shape}")
        pos = iv[(iv > 0) & np.isfinite(iv)]
        if pos.size == 0:
            raise ValueError("measure_noise_kernel: the ivar map has no positive pixel")
        thr = min_ivar_frac * np.median(pos)
        if min_ivar is not None:
            thr = max(thr, min_ivar)
        mask |= ~(iv >= thr)
        with np.errstate(divide="ignore"):
            err = _native(np.where(mask, 1e30, 1.0 / np.sqrt(np.where(mask, 1.0, iv))))
    data = np.where(mask, 0.0, data)
    mask = np.ascontiguousarray(mask)
    bkg = sep.Background(data, mask=mask, bw=bkg_box, bh=bkg_box, fw=3, fh=3)
    data = _native(data - bkg.back())
    data[mask] = 0.0
    sep.set_extract_pixstack(int(min(max(300_000, data.size), 20_000_000)))
    sep.set_sub_object_limit(4096)
    if err is None:
        _, seg = sep.extract(data, detect_thresh, err=bkg.globalrms, mask=mask, minarea=minarea, segmentation_map=True)
    else:
        # with correlated noise the per-pixel err underestimates the filtered noise; that only
        # makes the source mask more conservative
        _, seg = sep.extract(data, detect_thresh, err=err, mask=mask, minarea=minarea, segmentation_map=True)
    src = seg > 0
    if dilate > 0 and src.any():
        src = ndimage.binary_dilation(src, iterations=dilate)
    exclude = mask | src
    patches = extract_clean_patches(data, exclude, size=size, stride=stride)
    kernel = kernel_from_patches(patches)
    if return_info:
        info = {
            "n_patches": int(patches.shape[0]),
            "frac_excluded": float(exclude.mean()),
            "rms": float(np.sqrt(np.mean(patches**2))),
        }
        return kernel, info
    return kernel
