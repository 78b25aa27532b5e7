"""NFW lens model: projection, the gamma_t = kappa_bar - kappa identity, conventions, profiles."""

import numpy as np
import pytest
from astropy import units as u
from scipy import integrate

from wlshear.clash.lensing import (
    default_cosmology,
    lensing_efficiency,
    nfw_kappa_gamma,
    nfw_parameters,
    nfw_reduced_shear,
    nfw_sigma,
    shear_profile,
    tangential_cross,
)

M200, C, ZL, ZS = 1.2e15, 4.0, 0.352, 1.0


def test_sigma_matches_line_of_sight_projection():
    p = nfw_parameters(M200, C, ZL)
    # M(<r200) of the 3-D profile equals M200 (checks r200, delta_c)
    rho = lambda r: p["rho_s"] / ((r / p["r_s"]) * (1 + r / p["r_s"]) ** 2)  # noqa: E731
    m, _ = integrate.quad(lambda r: 4 * np.pi * r**2 * rho(r), 0, p["r200"])
    np.testing.assert_allclose(m, M200, rtol=1e-6)
    R = np.array([0.05, 0.3, p["r_s"], 1.5, 3.0])  # Mpc, including x = 1 exactly
    sig, _ = nfw_sigma(R, M200, C, ZL)
    proj = [2 * integrate.quad(lambda z: rho(np.hypot(r, z)), 0, np.inf, limit=200)[0] for r in R]
    np.testing.assert_allclose(sig, proj, rtol=1e-5)


def test_gamma_equals_mean_kappa_minus_kappa():
    R = np.array([5.0, 30.0, 90.0, 200.0, 400.0])  # arcsec
    kappa, gamma = nfw_kappa_gamma(R, M200, C, ZL, ZS)
    assert np.all(kappa > 0) and np.all(gamma > 0) and np.all(np.diff(kappa) < 0)
    # mean convergence inside r from the kappa profile alone: 2/r^2 int_0^r kappa(s) s ds,
    # integrated on a dense logarithmic grid (t = ln s handles the central cusp)
    t = np.linspace(np.log(1e-7), np.log(R.max()), 40001)
    k_t = nfw_kappa_gamma(np.exp(t), M200, C, ZL, ZS)[0]
    cum = integrate.cumulative_simpson(k_t * np.exp(2 * t), x=t, initial=0.0)
    kbar = 2 * np.interp(np.log(R), t, cum) / R**2
    np.testing.assert_allclose(kbar - kappa, gamma, rtol=1e-4)


def test_lensing_efficiency_flat_universe():
    cosmo = default_cosmology()
    assert cosmo.Om0 == 0.27 and cosmo.H0.value == 70
    zs = np.array([0.2, 0.5, 1.0, 3.0])
    beta = lensing_efficiency(ZL, zs)
    chi_l = cosmo.comoving_distance(ZL).to_value(u.Mpc)
    chi_s = cosmo.comoving_distance(zs).to_value(u.Mpc)
    expect = np.where(zs > ZL, 1 - chi_l / chi_s, 0.0)  # flat: D_ls / D_s = 1 - chi_l / chi_s
    np.testing.assert_allclose(beta, expect, rtol=1e-8)
    k1, g1 = nfw_kappa_gamma(60.0, M200, C, ZL, 1.0)
    k3, g3 = nfw_kappa_gamma(60.0, M200, C, ZL, 3.0)
    np.testing.assert_allclose(k3 / k1, lensing_efficiency(ZL, 3.0) / lensing_efficiency(ZL, 1.0), rtol=1e-8)
    assert np.all(np.array(nfw_kappa_gamma(60.0, M200, C, ZL, 0.2)) == 0)  # source in front of the lens


def test_tangential_convention_and_reduced_shear():
    # a source on the +x axis is stretched tangentially = along y -> g1 < 0, g2 = 0
    g1, g2, k = nfw_reduced_shear(np.array([60.0, 0.0, 60.0]), np.array([0.0, 60.0, 60.0]), M200, C, ZL, ZS)
    assert g1[0] < 0 and abs(g2[0]) < 1e-12
    assert g1[1] > 0 and abs(g2[1]) < 1e-12  # on the y axis: stretched along x -> g1 > 0
    assert g2[2] < 0 and abs(g1[2]) < 1e-12  # on the diagonal: perpendicular to x = y
    kappa, gamma = nfw_kappa_gamma(60.0, M200, C, ZL, ZS)
    gt, gx = tangential_cross(g1, g2, np.array([60.0, 0.0, 60.0]), np.array([0.0, 60.0, 60.0]))
    np.testing.assert_allclose(gt[:2], gamma / (1 - kappa), rtol=1e-12)
    np.testing.assert_allclose(gx, 0.0, atol=1e-14)


def test_shear_profile_recovers_nfw():
    rng = np.random.default_rng(3)
    n = 20000
    x, y = rng.uniform(-2000, 2000, n), rng.uniform(-2000, 2000, n)  # pixels around the centre
    g1, g2, _ = nfw_reduced_shear(x * 0.065, y * 0.065, M200, C, ZL, ZS)
    ok = np.isfinite(g1)
    e = 0.25 * rng.standard_normal((n, 2))
    bins = np.array([20.0, 40.0, 70.0, 110.0])  # arcsec
    prof = shear_profile(x[ok], y[ok], g1[ok] + e[ok, 0], g2[ok] + e[ok, 1], (0.0, 0.0), bins, pixel_scale=0.065)
    kappa, gamma = nfw_kappa_gamma(np.asarray(prof["r_mean"]), M200, C, ZL, ZS)
    model = gamma / (1 - kappa)
    pull_t = (prof["gt"] - model) / prof["gt_err"]
    pull_x = prof["gx"] / prof["gx_err"]
    assert np.all(np.abs(pull_t) < 4) and np.all(np.abs(pull_x) < 4)
    assert np.all(prof["gt"] > 5 * prof["gt_err"])
    assert np.all(np.abs(prof["gt_err"] - 0.25 / np.sqrt(prof["n"])) < 0.1 * prof["gt_err"])


def _wcs(cd):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [42.0, -3.5]
    w.wcs.crpix = [100, 100]
    w.wcs.cd = np.asarray(cd, dtype=float)
    w.wcs.set()
    return w


@pytest.mark.parametrize("rot_deg,flip", [(0, True), (30, True), (-75, True), (0, False), (120, False)])
def test_sky_frame_shears_follow_the_shape_on_the_sky(rot_deg, flip):
    """A shear is a spin-2 shape: carry the shape tensor Q ~ [[1 + g1, g2], [g2, 1 - g1]] through
    the WCS's pixel-to-sky matrix J (Q_sky = J Q J^T) and read (g1, g2) relative to (east, north);
    pixel_to_sky_shear must agree, and sky_to_pixel_shear must invert it."""
    from wlshear.clash.lensing import pixel_to_sky_shear, sky_to_pixel_shear, wcs_frame

    s = 0.065 / 3600
    t = np.radians(rot_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    cd = rot @ np.diag([-s if flip else s, s])
    w = _wcs(cd)
    theta, parity = wcs_frame(w)
    assert parity is flip
    g = np.random.default_rng(1).uniform(-0.3, 0.3, (50, 2))
    q = np.stack([np.stack([1 + g[:, 0], g[:, 1]], -1), np.stack([g[:, 1], 1 - g[:, 0]], -1)], -2)
    j = w.pixel_scale_matrix / s
    qs = j @ q @ j.T
    expect = np.stack([(qs[:, 0, 0] - qs[:, 1, 1]) / 2, qs[:, 0, 1]], -1)
    got = pixel_to_sky_shear(g, w)
    np.testing.assert_allclose(got, expect, atol=1e-12)
    np.testing.assert_allclose(sky_to_pixel_shear(got, w), g, atol=1e-12)
    if rot_deg == 0 and flip:  # north up, east left: (g1, -g2)
        np.testing.assert_allclose(got, g * [1, -1], atol=1e-12)


def test_skewed_wcs_is_refused_clearly():
    from wlshear.clash.lensing import pixel_to_sky_shear

    s = 0.065 / 3600
    with pytest.raises(ValueError, match="skewed or stretched"):
        pixel_to_sky_shear(np.zeros((2, 2)), _wcs([[-s, 0.2 * s], [0, s]]))
    with pytest.raises(ValueError, match="skewed or stretched"):
        pixel_to_sky_shear(np.zeros((2, 2)), _wcs([[-s, 0], [0, 1.1 * s]]))
