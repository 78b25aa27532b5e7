"""Correlated background noise of CLASH ACS drizzled images.

Noise is made by convolving iid N(0, 1) pixels with a small kernel K (7x7 for CLASH) and cropping
to the stamp: n = K * w. Its covariance is the autocorrelation of K:
Cov[n(p), n(p + d)] = sum_q K(q) K(q + d). Pixel values are in image counts (the same units as the
kernel). The default kernel is the one measured by Springer et al. from CLASH images; a kernel
measured from the user's own images (``python -m wlshear.tasks.noise_kernel``) can replace it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.signal import correlate2d, fftconvolve

DEFAULT_KERNEL_PATH = Path(__file__).parent / "data" / "clash_noise_kernel.txt"


def load_kernel(path: str | Path | None = None) -> np.ndarray:
    """Load a noise kernel [counts].

    ``path=None`` (or ``"default"``/``"clash"``) gives the embedded CLASH kernel. Accepts ``.npy``
    files (a 2-D array) and text files (whitespace table; an optional ``scale <float>`` line
    multiplies the values; ``#`` starts a comment).
    """
    if path is None or str(path) in ("default", "clash"):
        path = DEFAULT_KERNEL_PATH
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"noise kernel file not found: {path}")
    if path.suffix == ".npy":
        k = np.load(path, allow_pickle=False)
    else:
        scale = 1.0
        rows = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.lower().startswith("scale"):
                scale = float(line.split()[1])
                continue
            rows.append([float(v) for v in line.replace(",", " ").split()])
        k = np.asarray(rows, dtype=float) * scale
    k = np.asarray(k, dtype=float)
    if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError(f"noise kernel in {path} must be a 2-D array with odd sides, got shape {k.shape}")
    if not np.all(np.isfinite(k)):
        raise ValueError(f"noise kernel in {path} has non-finite values")
    return k


class CorrelatedNoise:
    """Stationary correlated Gaussian noise n = (scale * K) * w, w ~ iid N(0, 1).

    Parameters
    ----------
    kernel : array or path or None
        Convolution kernel [counts]; None means the embedded CLASH kernel.
    scale : float
        Multiplies the kernel (1, 0.5, 0.25 for the paper's three noise levels; 0 for no noise).
    """

    def __init__(self, kernel=None, scale: float = 1.0):
        if isinstance(kernel, (str, Path)) or kernel is None:
            kernel = load_kernel(kernel)
        self.base_kernel = np.asarray(kernel, dtype=float)
        if scale < 0:
            raise ValueError(f"noise scale must be >= 0, got {scale}")
        self.scale = float(scale)

    @property
    def kernel(self) -> np.ndarray:
        """The effective kernel, scale * K [counts]."""
        return self.base_kernel * self.scale

    @property
    def sigma(self) -> float:
        """Per-pixel noise standard deviation [counts]: sqrt(sum K^2)."""
        return float(np.sqrt(np.sum(self.kernel**2)))

    def covariance(self, max_lag: int | None = None) -> np.ndarray:
        """Autocovariance of the noise, shape (2L+1, 2L+1), centre = zero lag [counts^2]."""
        k = self.kernel
        c = correlate2d(k, k, mode="full")
        if max_lag is not None:
            cy, cx = c.shape[0] // 2, c.shape[1] // 2
            c = c[cy - max_lag : cy + max_lag + 1, cx - max_lag : cx + max_lag + 1]
        return c

    def sample(self, rng: np.random.Generator, n: int, shape=(32, 32), dtype=np.float32) -> np.ndarray:
        """Draw ``n`` noise fields of the given (ny, nx) shape [counts]."""
        ny, nx = shape
        if self.scale == 0:
            return np.zeros((n, ny, nx), dtype=dtype)
        ky, kx = self.base_kernel.shape
        w = rng.standard_normal((n, ny + ky - 1, nx + kx - 1))
        out = fftconvolve(w, self.kernel[None], mode="valid", axes=(1, 2))
        return out.astype(dtype, copy=False)

    def snr(self, image: np.ndarray) -> float | np.ndarray:
        """Matched-filter S/N of a noiseless image (or batch) in this noise.

        S/N = sum(I^2) / sqrt(I^T C I), with I^T C I = ||correlate(I, K)||^2 for C = K K^T.
        Returns inf when the noise scale is 0.
        """
        img = np.asarray(image, dtype=float)
        single = img.ndim == 2
        if single:
            img = img[None]
        if self.scale == 0:
            out = np.full(len(img), np.inf)
        else:
            k = self.kernel
            num = np.sum(img**2, axis=(1, 2))
            proj = fftconvolve(img, k[None, ::-1, ::-1], mode="full", axes=(1, 2))
            den = np.sqrt(np.sum(proj**2, axis=(1, 2)))
            with np.errstate(divide="ignore", invalid="ignore"):
                out = np.where(den > 0, num / den, 0.0)
        return float(out[0]) if single else out
