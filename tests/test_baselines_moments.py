"""Moments (RRG-like) baseline and stamp photometry on GalSim-rendered Gaussian galaxies."""

import galsim
import numpy as np
import pytest

from wlshear.baselines.moments import MomentsEstimator, gaussian_response, moments_ellipticity
from wlshear.observables import half_light_radius, measure_observables

SCALE = 0.065
PSF = galsim.Gaussian(fwhm=0.121)


def render(sigma_px, g1=0.0, g2=0.0, flux=10.0):
    """Noiseless round Gaussian (sigma in px, before the PSF), sheared, PSF-convolved, 32x32."""
    gal = galsim.Gaussian(sigma=sigma_px * SCALE, flux=flux).shear(g1=g1, g2=g2)
    return galsim.Convolve(gal, PSF).drawImage(nx=32, ny=32, scale=SCALE).array.astype(np.float64)


def test_half_light_radius_of_gaussians():
    for sigma in (1.0, 2.0, 3.0):
        img = render(sigma)
        s_obs = np.sqrt(sigma**2 + 0.784**2 + 1 / 12)
        assert half_light_radius(img) == pytest.approx(np.sqrt(2 * np.log(2)) * s_obs, rel=0.05)
    # batch form, noise robustness and failures
    rng = np.random.default_rng(0)
    noisy = render(2.0, flux=5.0)[None] + rng.normal(0, 3.6e-3, (20, 32, 32))
    assert np.allclose(half_light_radius(noisy), half_light_radius(render(2.0)), rtol=0.15)
    bad = half_light_radius(np.stack([np.zeros((32, 32)), np.full((32, 32), np.nan),
                                      -render(1.0)]))
    assert np.all(np.isnan(bad))


def test_measure_observables_magnitude_and_snr():
    stamps = np.stack([render(1.5, flux=10.0), render(1.5, flux=1.0)])
    obs = measure_observables(stamps, noise_sigma=3.6e-3)
    assert obs["mag"][0] == pytest.approx(25.4193 - 2.5, abs=0.01)
    assert obs["mag"][1] - obs["mag"][0] == pytest.approx(2.5, abs=1e-3)
    assert obs["snr"][0] == pytest.approx(10 * obs["snr"][1], rel=1e-3)
    k = np.zeros((7, 7))
    k[3, 3] = 3.6e-3  # a delta kernel is white noise: both noise models must agree
    obs_k = measure_observables(stamps, noise_kernel=k)
    np.testing.assert_allclose(obs_k["snr"], obs["snr"])


def test_moments_sign_convention():
    stamps = np.stack([render(2.0, 0.1, 0), render(2.0, -0.1, 0), render(2.0, 0, 0.1),
                       render(2.0, 0, -0.1), render(2.0)])
    chi, failed = MomentsEstimator().estimate(stamps)
    assert not failed.any()
    assert chi[0, 0] > 0.05 and chi[1, 0] < -0.05 and chi[2, 1] > 0.05 and chi[3, 1] < -0.05
    assert np.all(np.abs(chi[[0, 1], 1]) < 1e-6) and np.all(np.abs(chi[[2, 3], 0]) < 1e-6)
    assert np.all(np.abs(chi[4]) < 1e-6)
    # transposing the stamp (x <-> y) flips chi1 and keeps chi2
    chi_t, _ = moments_ellipticity(np.swapaxes(stamps, 1, 2))
    np.testing.assert_allclose(chi_t, chi * np.array([-1, 1]), atol=1e-10)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
def test_moments_response_matches_gaussian_analytic(sigma):
    """Small-shear response d chi / d g equals the analytic Gaussian value (within 10 %) and is the
    same at two shear amplitudes (linear regime)."""
    amps = (0.01, 0.03)
    stamps = np.stack([render(sigma, s * a, 0) for a in amps for s in (1, -1)]
                      + [render(sigma, 0, s * a) for a in amps for s in (1, -1)])
    chi, failed, details = moments_ellipticity(stamps, return_details=True)
    assert not failed.any()
    resp1 = [(chi[2 * i, 0] - chi[2 * i + 1, 0]) / (2 * a) for i, a in enumerate(amps)]
    resp2 = [(chi[4 + 2 * i, 1] - chi[5 + 2 * i, 1]) / (2 * a) for i, a in enumerate(amps)]
    analytic = gaussian_response(sigma, weight_sigma=details["w"][0])
    assert 1.0 < analytic < 1.6
    for r in resp1 + resp2:
        assert r == pytest.approx(analytic, rel=0.10)
    assert resp1[0] == pytest.approx(resp1[1], rel=0.01)
    assert resp1[0] == pytest.approx(resp2[0], rel=0.01)


def test_moments_failures():
    stamps = np.stack([render(2.0), np.zeros((32, 32)), np.full((32, 32), np.nan),
                       -render(2.0)])
    chi, failed = MomentsEstimator().estimate(stamps)
    assert failed.tolist() == [False, True, True, True]
    assert np.all(np.isfinite(chi[0])) and np.all(np.isnan(chi[1:]))
