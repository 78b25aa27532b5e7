"""The authors' released CNN (wlenet) run in numpy: orientation, response and symmetry."""

from pathlib import Path

import galsim
import numpy as np
import pytest
from scipy.signal import fftconvolve

from wlshear.baselines.wlenet import WLENetEstimator, release_files
from wlshear.models.symmetry import shear_sign

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()
RELEASE = SHARED / "data" / "wlenet_release"
needs_release = pytest.mark.skipif(
    not (RELEASE / "cnn_image_clash_uniform_mse_lsq.hdf5").is_file(),
    reason=f"wlenet release files not found in {RELEASE} (shared data absent)",
)
SCALE = 0.065
PSF = galsim.Gaussian(fwhm=0.121)


def test_missing_release_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cnn_image_clash_uniform_mse_lsq.hdf5"):
        WLENetEstimator(tmp_path)
    with pytest.raises(ValueError, match="noise_level"):
        release_files(tmp_path, "0.3")
    assert release_files(tmp_path, 0.5)[0].name == "cnn_image_clash_uniform_mse_lsq_noise_0.500.hdf5"


def test_symmetry_group_signs():
    # (quarter turns, transposed?, s1, s2) of the 8 symmetries the estimator averages over
    ops = [(k % 4, k >= 4, *shear_sign(k)) for k in range(8)]
    assert len(ops) == 8 and len({(k, t) for k, t, _, _ in ops}) == 8
    signs = {(k, t): (s1, s2) for k, t, s1, s2 in ops}
    assert signs[(0, True)] == (-1, 1)  # transpose
    assert signs[(1, False)] == (-1, -1)  # quarter turn
    assert signs[(2, False)] == (1, 1)  # half turn
    assert signs[(1, True)] == (1, -1)  # quarter turn + transpose = a single-axis flip


def _noisy_population(n, rng):
    kernel = np.load(RELEASE / "clash_noise_kernel.npy")
    g = rng.uniform(-0.2, 0.2, (n, 2))
    stamps = np.empty((n, 32, 32))
    for i in range(n):
        e = rng.normal(0, 0.2, 2)
        e *= min(1.0, 0.6 / max(np.hypot(*e), 1e-9))
        gal = galsim.Sersic(n=rng.uniform(0.8, 3), half_light_radius=rng.uniform(0.08, 0.3),
                            flux=rng.uniform(1, 8))
        gal = gal.shear(g1=e[0], g2=e[1]).shear(g1=g[i, 0], g2=g[i, 1])
        img = galsim.Convolve(gal, PSF).drawImage(nx=32, ny=32, scale=SCALE).array
        stamps[i] = img + fftconvolve(rng.normal(size=(38, 38)), kernel, mode="valid")
    return g, stamps


@needs_release
def test_elongated_along_x_gives_positive_g1():
    rng = np.random.default_rng(0)
    kernel = np.load(RELEASE / "clash_noise_kernel.npy")
    gal = galsim.Exponential(half_light_radius=0.2, flux=30.0).shear(g1=0.15, g2=0.0)
    img = galsim.Convolve(gal, PSF).drawImage(nx=32, ny=32, scale=SCALE).array
    noise = 0.25 * np.stack([fftconvolve(rng.normal(size=(38, 38)), kernel, mode="valid")
                             for _ in range(8)])
    stamps = img[None] + noise
    est = WLENetEstimator(RELEASE)
    g, failed = est.estimate(stamps)
    assert not failed.any()
    assert np.all(g[:, 0] > 0.05) and np.all(np.abs(g[:, 1]) < 0.05)
    g_t, _ = est.estimate(np.swapaxes(stamps, 1, 2))  # elongated along y now
    assert np.all(g_t[:, 0] < -0.05)


@needs_release
def test_symmetrised_estimator_is_equivariant():
    rng = np.random.default_rng(1)
    stamps = rng.normal(size=(5, 32, 32))
    est = WLENetEstimator(RELEASE, calibrate=False)
    g, _ = est.estimate(stamps)
    g_t, _ = est.estimate(np.swapaxes(stamps, 1, 2))
    g_r, _ = est.estimate(np.rot90(stamps, 1, axes=(1, 2)))
    np.testing.assert_allclose(g_t, g * [-1, 1], atol=1e-10)
    np.testing.assert_allclose(g_r, -g, atol=1e-10)


@needs_release
def test_population_response_and_failures():
    rng = np.random.default_rng(2)
    g_true, stamps = _noisy_population(200, rng)
    for sym in (True, False):
        g, failed = WLENetEstimator(RELEASE, symmetrize=sym).estimate(stamps)
        assert not failed.any()
        for k in range(2):
            assert np.corrcoef(g_true[:, k], g[:, k])[0, 1] > 0.3
            slope = np.polyfit(g_true[:, k], g[:, k], 1)[0]
            assert 0.5 < slope < 2.0
    g, failed = WLENetEstimator(RELEASE, noise_level="0.250").estimate(
        np.stack([stamps[0], np.zeros((32, 32)), np.full((32, 32), np.nan)]))
    assert failed.tolist() == [False, True, True]
