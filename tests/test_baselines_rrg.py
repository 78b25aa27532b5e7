"""RRG baseline (Rhodes, Refregier & Groth 2000): the PSF correction and the shear susceptibility
against cases with a known answer, and a known input shear coming back without a fitted
calibration (where the weighted moments' chi needs one)."""

import galsim
import numpy as np
import pytest

from wlshear.baselines.moments import moments_ellipticity
from wlshear.baselines.rrg import (
    RRGEstimator,
    rrg_correct,
    rrg_ellipticity,
    rrg_moments,
    rrg_shear,
    rrg_sigma_psf,
    rrg_susceptibility,
)

SCALE = 0.065
SIGMA_P = 0.79  # px, a Gaussian PSF drawn without the pixel
PSF_NOPIX = galsim.Gaussian(sigma=SIGMA_P * SCALE)
CLASH_PSF = galsim.Gaussian(fwhm=0.121)


def draw(gal, psf=None, n=48, method="no_pixel"):
    if psf is not None:
        gal = galsim.Convolve(gal, psf)
    return gal.drawImage(nx=n, ny=n, scale=SCALE, method=method).array.astype(np.float64)


def test_sigma_psf_of_clash():
    assert rrg_sigma_psf(include_pixel=False) == pytest.approx(0.121 / 2.35482 / 0.065, rel=1e-4)
    assert rrg_sigma_psf() == pytest.approx(np.hypot(0.121 / 2.35482 / 0.065, np.sqrt(1 / 12)), rel=1e-4)


@pytest.mark.parametrize("profile", [galsim.Gaussian, galsim.Exponential])
def test_psf_correction_recovers_the_pre_seeing_moments(profile):
    """For a Gaussian PSF and weight the correction is exact for any profile: the corrected moments
    of the convolved image are the galaxy's own moments under the weight w' = sqrt(w^2 + sigma_p^2)
    (the reference is drawn on a 5x finer grid, so that the exponential's cusp is integrated)."""
    gal = profile(half_light_radius=0.15, flux=10.0).shear(g1=0.25, g2=-0.1)
    w = 3.0
    cor = rrg_correct(rrg_moments(draw(gal, PSF_NOPIX, n=64)[None], weight_sigma=w), SIGMA_P)
    fine = gal.drawImage(nx=320, ny=320, scale=SCALE / 5, method="no_pixel").array[None]
    ref = rrg_moments(fine, weight_sigma=5 * np.hypot(w, SIGMA_P))
    scale = max(ref["xx"][0], ref["yy"][0]) / 25
    for key in ("xx", "yy", "xy", "xxxx", "xxxy", "xxyy", "xyyy", "yyyy"):
        order = len(key) // 2
        assert cor[key][0] == pytest.approx(ref[key][0] / 25**order, rel=1e-3, abs=1e-3 * scale**order), key
    assert cor["w_eff"][0] == pytest.approx(np.hypot(w, SIGMA_P))


@pytest.mark.parametrize("profile", [galsim.Gaussian, galsim.Exponential])
def test_susceptibility_matches_finite_differences(profile):
    """d e_i / d g_i of a sheared galaxy under the PSF (fixed weight) is the per-galaxy formula."""
    base = profile(half_light_radius=0.15, flux=10.0).shear(e1=0.2, e2=0.1)
    h = 1e-4

    def e_of(g1, g2):
        cor = rrg_correct(rrg_moments(draw(base.shear(g1=g1, g2=g2), PSF_NOPIX)[None], weight_sigma=2.5), SIGMA_P)
        return rrg_ellipticity(cor)[0][0]

    fd = [(e_of(h, 0)[0] - e_of(-h, 0)[0]) / (2 * h), (e_of(0, h)[1] - e_of(0, -h)[1]) / (2 * h)]
    cor0 = rrg_correct(rrg_moments(draw(base, PSF_NOPIX)[None], weight_sigma=2.5), SIGMA_P)
    G = rrg_susceptibility(cor0, per_galaxy=True)[0]
    np.testing.assert_allclose(G, fd, rtol=1e-3)
    assert 0.5 < G[0] < 2.0  # the weight takes a real part of the response away from 2


def _ring(profile, hlr, g, n=8, e=0.3):
    out = []
    for k in range(n):
        th = np.pi * k / n
        gal = profile(half_light_radius=hlr, flux=10.0).shear(e1=e * np.cos(2 * th), e2=e * np.sin(2 * th))
        out.append(draw(gal.shear(g1=g[0], g2=g[1]), CLASH_PSF, n=32, method="auto"))
    return np.stack(out)


def test_known_shear_comes_back_without_calibration():
    """Noiseless rings of 8 orientations of Gaussian, exponential and de Vaucouleurs galaxies of
    hlr 0.1" and 0.2" under the CLASH PSF and pixel, 32 px stamps: RRG's shear has |m| < 0.01 for
    every one (0.008 at most); the weighted moments' chi of the same stamps has m from -0.06 to +0.30,
    which is why it needs a fitted calibration."""
    g = np.array([0.02, -0.01])
    m_rrg, m_chi = [], []
    for profile in (galsim.Gaussian, galsim.Exponential, galsim.DeVaucouleurs):
        for hlr in (0.1, 0.2):
            stamps = _ring(profile, hlr, g)
            est, failed = RRGEstimator().estimate(stamps)
            assert not failed.any()
            m_rrg.append(est.mean(axis=0) / g - 1)
            m_chi.append(moments_ellipticity(stamps)[0].mean(axis=0) / g - 1)
    m_rrg, m_chi = np.array(m_rrg), np.array(m_chi)
    assert np.all(np.abs(m_rrg) < 0.01), m_rrg
    assert np.ptp(m_chi[:, 0]) > 0.3, m_chi


def test_sign_convention_fixed_response_and_failures():
    gal = galsim.Exponential(half_light_radius=0.15, flux=10.0)
    stamps = np.stack([draw(gal.shear(g1=0.1, g2=0), CLASH_PSF, 32, "auto"),
                       draw(gal.shear(g1=0, g2=0.1), CLASH_PSF, 32, "auto"),
                       np.zeros((32, 32)), np.full((32, 32), np.nan)])
    g, failed = rrg_shear(stamps, response=1.5)
    assert failed.tolist() == [False, False, True, True]
    assert g[0, 0] > 0.05 and abs(g[0, 1]) < 1e-3 and g[1, 1] > 0.05 and abs(g[1, 0]) < 1e-3
    assert np.isnan(g[2:]).all()
    # the ensemble G ignores failed rows; a batch with no usable row gives NaN, not a crash
    g_ens, _, det = rrg_shear(stamps, return_details=True)
    assert np.isfinite(det["G"]) and np.isfinite(g_ens[:2]).all()
    g_bad, failed_bad = rrg_shear(stamps[2:])
    assert failed_bad.all() and np.isnan(g_bad).all()
    with pytest.raises(ValueError, match="ensemble"):
        RRGEstimator(response="individual")
    with pytest.raises(ValueError, match="positive"):
        RRGEstimator(response=-1.0)
    with pytest.raises(ValueError, match="sigma_psf"):
        RRGEstimator(sigma_psf=-0.5)
    assert RRGEstimator().whole_batch and not RRGEstimator(response=1.2).whole_batch


def test_noise_dominated_rows_fail_and_leave_the_average_alone():
    """A slightly elongated star has corrected size T ~ 0 and |e| ~ 5: it fails (|e| >= e_max) and
    the ensemble G of the batch is that of the galaxies alone."""
    gals = _ring(galsim.Exponential, 0.15, (0.02, 0.0), n=4)
    star = draw(galsim.Gaussian(fwhm=0.121).shear(g1=0.05), n=32, method="auto")
    _, _, loose = rrg_shear(star[None], e_max=np.inf, return_details=True)
    assert np.hypot(*loose["e"][0]) > 2
    g, failed, det = rrg_shear(np.concatenate([gals, star[None]]), return_details=True)
    assert failed.tolist() == [False] * 4 + [True] and np.isnan(g[4]).all()
    assert det["G"] == pytest.approx(rrg_shear(gals, return_details=True)[2]["G"], rel=1e-12)
    with pytest.raises(ValueError, match="e_max"):
        RRGEstimator(e_max=0)


def test_known_shear_on_the_default_population():
    """4,000 ring-paired noisy stamps of the embedded default population (torch renderer, full CLASH
    noise): RRG's shear with no fitted calibration has |m| < 0.05 and |c| < 0.005."""
    from hydra.utils import instantiate

    from wlshear.metrics.bias import fit_bias
    from wlshear.utils.hydra import compose_config

    dm = instantiate(compose_config("evaluate").data)
    batch = dm.eval_renderer.with_backend("torch").simulate(4000, seed=[2026, 12, 5], ring=True)
    g, failed = RRGEstimator().estimate(batch.stamps)
    assert failed.mean() < 0.01
    truth = np.stack([batch.meta["g1"], batch.meta["g2"]], 1)
    fit = fit_bias(truth, g, failed=failed, pair_ids=batch.meta["pair_id"])
    assert np.all(np.abs(fit.m) < 0.05), fit.m
    assert np.all(np.abs(fit.c) < 0.005), fit.c
