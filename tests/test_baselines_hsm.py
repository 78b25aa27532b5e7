"""GalSim HSM KSB / REGAUSS wrappers: sign conventions, shear recovery and failure flags."""

import galsim
import numpy as np
import pytest

from wlshear.baselines.hsm import KSBEstimator, REGAUSSEstimator

SCALE = 0.065
PSF = galsim.Gaussian(fwhm=0.121)


def render(g1=0.0, g2=0.0, hlr=0.15, flux=20.0):
    gal = galsim.Gaussian(half_light_radius=hlr, flux=flux).shear(g1=g1, g2=g2)
    return galsim.Convolve(gal, PSF).drawImage(nx=32, ny=32, scale=SCALE).array


@pytest.mark.parametrize("cls", [KSBEstimator, REGAUSSEstimator])
def test_sign_convention_and_shear_recovery(cls):
    stamps = np.stack([render(0.1, 0), render(0, 0.1), render(-0.1, 0), render(0, -0.1)])
    g, failed = cls().estimate(stamps)
    assert not failed.any()
    assert g[0, 0] > 0 and g[1, 1] > 0 and g[2, 0] < 0 and g[3, 1] < 0
    # noiseless PSF-corrected round Gaussian: the shear itself is recovered closely
    np.testing.assert_allclose(g, [[0.1, 0], [0, 0.1], [-0.1, 0], [0, -0.1]], atol=0.01)
    # along x in the array (axis 1) means g1 > 0: an explicit x-elongated array
    yy, xx = np.mgrid[0:32, 0:32] - 15.5
    elongated_x = np.exp(-0.5 * (xx**2 / 9.0 + yy**2 / 4.0))
    gx, _ = cls().estimate(elongated_x[None])
    assert gx[0, 0] > 0.05 and abs(gx[0, 1]) < 1e-3
    gt, _ = cls().estimate(elongated_x.T[None])
    assert gt[0, 0] < -0.05


@pytest.mark.parametrize("cls", [KSBEstimator, REGAUSSEstimator])
def test_failures_are_flagged(cls):
    stamps = np.stack([render(), np.zeros((32, 32)), np.full((32, 32), np.nan)])
    g, failed = cls().estimate(stamps)
    assert failed.tolist() == [False, True, True]
    assert np.all(np.isfinite(g[0])) and np.all(np.isnan(g[1:]))


def test_unphysical_ksb_estimates_are_flagged_not_kept():
    import galsim

    from wlshear.baselines.hsm import KSBEstimator

    # a faint, barely resolved galaxy in strong noise: KSB often returns |g| >> 1
    rng = np.random.default_rng(3)
    gal = galsim.Convolve(galsim.Gaussian(sigma=0.03, flux=0.2), galsim.Gaussian(fwhm=0.121))
    img = gal.drawImage(nx=32, ny=32, scale=0.065).array
    stamps = img[None] + rng.normal(0, 0.006, (60, 32, 32))
    g_keep, f_keep = KSBEstimator(max_abs_g=None).estimate(stamps)
    g_cut, f_cut = KSBEstimator().estimate(stamps)
    wild = ~f_keep & (np.hypot(g_keep[:, 0], g_keep[:, 1]) >= 1)
    assert wild.sum() >= 3  # the set really provokes unphysical estimates
    assert np.all(f_cut[wild])  # every wild estimate is now a counted failure
    ok = ~f_cut
    assert np.all(np.hypot(g_cut[ok, 0], g_cut[ok, 1]) < 1)
    assert f_cut.sum() == f_keep.sum() + wild.sum()
