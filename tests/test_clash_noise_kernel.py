"""Recovering the 7x7 correlated-noise kernel from a synthetic image (and the CLI)."""

import numpy as np
from astropy.io import fits
from scipy import signal

from wlshear.clash.noise_kernel import measure_noise_kernel
from wlshear.tasks.noise_kernel import main

# K_bg of docs method.md ("CLASH field analysis"), image counts x 1e-5, rows top to bottom
K_BG = 1e-5 * np.array(
    [
        [1.84, 2.26, 2.84, 2.75, 2.46, 2.41, 2.01],
        [2.42, 2.82, 3.12, 2.97, 3.28, 2.21, 1.87],
        [2.52, 2.40, 5.57, 28.00, 5.42, 2.28, 2.27],
        [2.03, 1.74, 24.99, 355.90, 25.08, 1.92, 2.13],
        [2.23, 2.28, 5.24, 27.87, 5.60, 2.24, 2.46],
        [1.85, 2.26, 3.14, 2.94, 3.17, 2.77, 2.30],
        [2.17, 2.46, 2.56, 3.00, 2.64, 2.26, 1.88],
    ]
)


def _synthetic(n, seed, n_src=25):
    rng = np.random.default_rng(seed)
    img = signal.fftconvolve(rng.standard_normal((n + 6, n + 6)), K_BG, mode="valid")
    yy, xx = np.mgrid[:n, :n]
    for _ in range(n_src):  # bright extended sources that must be masked
        x0, y0 = rng.uniform(30, n - 30, 2)
        s = rng.uniform(1.5, 4.0)
        img += rng.uniform(0.05, 1.0) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s**2))
    img += 0.002  # a constant sky level, removed by the background step
    ivar = np.full((n, n), 1 / 3.6e-3**2)
    ivar[:, : n // 8] = 1.0  # an under-exposed strip, excluded
    img[:, : n // 8] += rng.normal(0, 0.05, (n, n // 8))
    return img, ivar


def test_kernel_recovered_within_10_percent():
    img, ivar = _synthetic(900, seed=5)
    k, info = measure_noise_kernel(img, ivar, return_info=True)
    assert k.shape == (7, 7) and info["n_patches"] > 20000
    assert info["frac_excluded"] > 0.12  # strip + sources masked
    rel_frob = np.linalg.norm(k - K_BG) / np.linalg.norm(K_BG)
    assert rel_frob < 0.10, rel_frob
    cross = [(3, 3), (2, 3), (4, 3), (3, 2), (3, 4)]  # centre and its four neighbours
    for ij in cross:
        assert abs(k[ij] / K_BG[ij] - 1) < 0.10, (ij, k[ij], K_BG[ij])
    # per-pixel sigma sqrt(sum K^2) = 3.60e-3
    assert abs(np.sqrt((k**2).sum()) / 3.6e-3 - 1) < 0.05


def test_unmasked_sources_would_bias_and_cli_writes_files(tmp_path):
    img, ivar = _synthetic(400, seed=6, n_src=10)
    fits.PrimaryHDU(img.astype(">f4")).writeto(tmp_path / "total.fits")
    fits.PrimaryHDU(ivar.astype(">f4")).writeto(tmp_path / "ivar.fits")
    rc = main([f"image={tmp_path / 'total.fits'}", f"weight={tmp_path / 'ivar.fits'}", f"out={tmp_path / 'kernel.npy'}"])
    assert rc == 0
    k = np.load(tmp_path / "kernel.npy")
    np.testing.assert_allclose(np.loadtxt(tmp_path / "kernel.txt"), k, rtol=1e-5)
    assert np.linalg.norm(k - K_BG) / np.linalg.norm(K_BG) < 0.15
    # without the source mask (no detection, no dilation) the kernel is badly wrong
    k_bad = measure_noise_kernel(img, ivar, detect_thresh=1e9, dilate=0)
    assert np.linalg.norm(k_bad - K_BG) / np.linalg.norm(K_BG) > 0.3
