"""AnaCal FPFS wrapper: signs, shear recovery, failures (skipped without anacal)."""

import galsim
import numpy as np
import pytest

pytest.importorskip("anacal", reason="FPFS baseline needs the anacal package (pip install anacal==0.8.3)")

from wlshear.baselines.fpfs import FPFSEstimator  # noqa: E402

SCALE = 0.065
PSF = galsim.Gaussian(fwhm=0.121)


def render(g1=0.0, g2=0.0, hlr=0.15, flux=20.0):
    gal = galsim.Gaussian(half_light_radius=hlr, flux=flux).shear(g1=g1, g2=g2)
    return galsim.Convolve(gal, PSF).drawImage(nx=32, ny=32, scale=SCALE).array


def test_fpfs_sign_and_response():
    stamps = np.stack([render(0.05, 0), render(0, 0.05), render(-0.05, 0), render(0, -0.05)])
    est = FPFSEstimator(response="individual")
    g, failed = est.estimate(stamps)
    assert not failed.any()
    np.testing.assert_allclose(g, [[0.05, 0], [0, 0.05], [-0.05, 0], [0, -0.05]], atol=0.005)
    raw = est.measure(stamps)
    assert np.all(raw["R"] > 0.2) and np.all(raw["s2n"] > 10)
    # un-normalised ellipticity keeps the sign, ensemble response gives a similar shear
    e, _ = FPFSEstimator(response="none").estimate(stamps)
    assert e[0, 0] > 0 and e[1, 1] > 0
    ge, _ = FPFSEstimator(response="ensemble").estimate(stamps)
    np.testing.assert_allclose(ge, g, atol=0.005)


def test_fpfs_failures():
    stamps = np.stack([render(), np.zeros((32, 32)), np.full((32, 32), np.nan)])
    g, failed = FPFSEstimator().estimate(stamps)
    assert failed.tolist() == [False, True, True]
    assert np.all(np.isfinite(g[0])) and np.all(np.isnan(g[1:]))


def test_bad_response_option():
    with pytest.raises(ValueError, match="response"):
        FPFSEstimator(response="mean")
