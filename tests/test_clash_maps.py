"""Shear maps, bootstrap noise, map sampling/FITS output, hold-out errors and the Hogg fit."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from wlshear.clash.errors import fit_line_xy_errors, holdout_sigma_source, relative_calibration
from wlshear.clash.maps import (
    bootstrap_at,
    bootstrap_covariance,
    bootstrap_indices,
    bootstrap_maps,
    make_grid,
    map_at,
    shear_map,
    smooth_at,
    write_map_fits,
)
from wlshear.metrics.plots import plot_whiskers


def _catalogue(n, size=1000, rng=0, g=(0.05, -0.03), noise=0.25):
    rng = np.random.default_rng(rng)
    x = rng.uniform(0, size, n)
    y = rng.uniform(0, size, n)
    gg = np.tile(np.asarray(g, float), (n, 1)) + noise * rng.standard_normal((n, 2))
    return x, y, gg


def test_grid_geometry():
    grid = make_grid((1005, 998))
    assert grid.step == 10 and grid.shape == (101, 100)
    xc, yc = grid.centers()
    assert xc[0] == 4.5 and yc[3] == 34.5
    with pytest.raises(ValueError, match="whole number"):
        make_grid((100, 100), cell_arcsec=0.6)


def test_constant_shear_recovered():
    x, y, g = _catalogue(3000, noise=0.0)
    grid = make_grid((1000, 1000))
    maps, dens = shear_map(x, y, g, grid, scale_arcsec=19.5)
    assert maps.shape == (2, 100, 100) and dens.shape == (100, 100)
    np.testing.assert_allclose(maps[0], 0.05, atol=1e-12)
    np.testing.assert_allclose(maps[1], -0.03, atol=1e-12)
    # with shape noise: unbiased and noise as predicted by the kernel weights
    x, y, g = _catalogue(20000, noise=0.25, rng=1)
    maps, dens = shear_map(x, y, g, grid, scale_arcsec=6.5)
    inner = (slice(30, 70), slice(30, 70))
    assert abs(np.mean(maps[0][inner]) - 0.05) < 0.01
    assert abs(np.mean(maps[1][inner]) + 0.03) < 0.01
    # exact point evaluation agrees with the grid at cell centres
    xc, yc = grid.centers()
    pts = smooth_at(x, y, g, xc[[10, 50]], yc[[20, 60]], scale_arcsec=6.5)
    np.testing.assert_allclose(pts, maps[:, [20, 60], [10, 50]].T, rtol=1e-10)


def test_bootstrap_sigma_scaling_and_covariance():
    grid = make_grid((1000, 1000))
    sig = {}
    for n in (500, 2000):
        x, y, g = _catalogue(n, rng=n)
        sig[n] = bootstrap_maps(x, y, g, grid, scale_arcsec=13.0, n_boot=60, rng=3)
        assert sig[n].shape == (2, 100, 100)
    inner = (slice(None), slice(25, 75), slice(25, 75))
    ratio = np.median(sig[500][inner]) / np.median(sig[2000][inner])
    assert 1.75 < ratio < 2.3  # ~ sqrt(2000 / 500) = 2
    # absolute level vs the analytic kernel-weighted noise sigma_e sqrt(sum K^2) / sum K
    x, y, g = _catalogue(2000, rng=2000)
    lam = 13.0 / 0.065
    xc, yc = grid.centers()
    k = np.exp(-((x - xc[50]) ** 2 + (y - yc[50]) ** 2) / (2 * lam**2))
    expect = 0.25 * np.sqrt(np.sum(k**2)) / np.sum(k)
    assert abs(sig[2000][0, 50, 50] / expect - 1) < 0.3
    # the same index sets for two estimators: covariance of an estimator with itself = variance,
    # with an independent-noise estimator ~ 0
    idx = bootstrap_indices(len(x), 40, rng=5)
    noise2 = np.random.default_rng(9).normal(0, 0.25, g.shape)
    s_a, samp_a = bootstrap_maps(x, y, g, grid, 13.0, index_sets=idx, return_samples=True)
    s_b, samp_b = bootstrap_maps(x, y, g + noise2, grid, 13.0, index_sets=idx, return_samples=True)
    np.testing.assert_allclose(bootstrap_covariance(samp_a, samp_a), s_a**2, rtol=1e-4)
    corr = bootstrap_covariance(samp_a, samp_b) / (s_a * s_b)
    assert 0.5 < np.median(corr[inner]) < 0.9  # shared shape noise, independent extra noise


def test_map_at_interpolation():
    grid = make_grid((200, 300))
    xc, yc = grid.centers()
    m = 0.01 * xc[None, :] - 0.02 * yc[:, None]  # linear field: bilinear is exact inside
    xq = np.array([13.2, 101.7, 250.0])
    yq = np.array([40.1, 77.7, 150.3])
    np.testing.assert_allclose(map_at(m, grid, xq, yq), 0.01 * xq - 0.02 * yq, rtol=1e-10)
    both = map_at(np.stack([m, -m]), grid, xq, yq)
    assert both.shape == (2, 3)
    np.testing.assert_allclose(both[1], -both[0])


def test_map_fits_wcs_and_whiskers(tmp_path):
    shape = (400, 500)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [177.4, 22.4]
    w.wcs.crpix = [240.3, 190.8]
    w.wcs.cd = [[-0.065 / 3600 * 0.8, 0.065 / 3600 * 0.6], [0.065 / 3600 * 0.6, 0.065 / 3600 * 0.8]]
    grid = make_grid(shape)
    x, y, g = _catalogue(800, size=400, rng=4, noise=0.1)
    maps, _ = shear_map(x, y, g, grid, 6.5)
    path = write_map_fits(tmp_path / "m.fits", {"G1": maps[0], "G2": maps[1]}, grid, w, {"LAMBDA": 6.5})
    with fits.open(path) as h:
        np.testing.assert_allclose(h["G1"].data, maps[0], rtol=1e-6)
        assert h["G2"].header["LAMBDA"] == 6.5
        mw = WCS(h["G1"].header)
    # map cell (i, j) centre <-> image pixel (i*10 + 4.5, j*10 + 4.5): same sky position
    i, j = np.array([0, 7, 49]), np.array([0, 33, 39])
    sky_map = np.array(mw.pixel_to_world_values(i, j))
    sky_img = np.array(w.pixel_to_world_values(i * 10 + 4.5, j * 10 + 4.5))
    np.testing.assert_allclose(sky_map, sky_img, atol=1e-9)
    png = plot_whiskers(maps[0], maps[1], grid, tmp_path / "w.png", background=np.zeros(shape))
    assert png.stat().st_size > 5000


def test_holdout_sigma_source_recovers_injected_noise():
    rng = np.random.default_rng(11)
    n, size = 4000, 2000
    x, y = rng.uniform(0, size, n), rng.uniform(0, size, n)
    field = np.column_stack([0.05 * np.sin(2 * np.pi * x / 4000), 0.04 * np.cos(2 * np.pi * y / 5000)])
    g = field + 0.25 * rng.standard_normal((n, 2))
    res = holdout_sigma_source(x, y, g, scale_arcsec=13.0, n_boot=60, rng=1)
    assert res["n_test"] == 2000 and res["n_train"] == 2000 and not res["negative"].any()
    np.testing.assert_allclose(res["sigma_source"], 0.25, atol=0.015)
    # naive RMS about the map overestimates the per-galaxy error
    assert np.all(res["sigma_field_source"] > res["sigma_source"])
    assert np.all(res["sigma_field"] > 0.01)


def test_bootstrap_at_matches_grid_bootstrap():
    x, y, g = _catalogue(600, size=500, rng=8)
    grid = make_grid((500, 500))
    idx = bootstrap_indices(600, 30, rng=2)
    _, samp = bootstrap_maps(x, y, g, grid, 6.5, index_sets=idx, return_samples=True)
    xc, yc = grid.centers()
    pts = bootstrap_at(x, y, g, xc[[5, 30]], yc[[12, 40]], 6.5, index_sets=idx)
    assert pts.shape == (30, 2, 2)
    np.testing.assert_allclose(pts[:, 0, :], samp[:, :, 12, 5], rtol=1e-5)


def _hogg_data(rng, n=300, slope=1.1, icpt=0.01, sx=0.03, sy=0.02, rho=0.4):
    xt = rng.uniform(-0.1, 0.1, n)
    cov = np.array([[sx**2, rho * sx * sy], [rho * sx * sy, sy**2]])
    e = rng.multivariate_normal([0, 0], cov, n)
    return xt + e[:, 0], slope * xt + icpt + e[:, 1], sx, sy, rho * sx * sy


def test_hogg_fit_recovers_slope_where_ols_is_attenuated():
    rng = np.random.default_rng(2024)
    ms, cs, merr, ols = [], [], [], []
    for _ in range(25):
        x, y, sx, sy, sxy = _hogg_data(rng)
        r = fit_line_xy_errors(x, y, sx, sy, sxy)
        assert r["success"]
        ms.append(r["m"])
        cs.append(r["c"])
        merr.append(r["m_err"])
        ols.append(np.polyfit(x, y, 1)[0] - 1)
    ms, cs, merr = np.array(ms), np.array(cs), np.array(merr)
    # unbiased: mean over realisations within 3 standard errors of the truth
    assert abs(ms.mean() - 0.1) < 3 * ms.std() / np.sqrt(ms.size)
    assert abs(cs.mean() - 0.01) < 3 * cs.std() / np.sqrt(cs.size) + 1e-4
    # quoted errors match the scatter between realisations
    assert 0.7 < merr.mean() / ms.std() < 1.4
    # ordinary least squares is attenuated (expected slope 1.1 * 0.787 ~ 0.87)
    assert np.mean(ols) < -0.05
    # one realisation: truth within ~3 sigma, bootstrap errors similar to Hessian errors
    r = fit_line_xy_errors(x, y, sx, sy, sxy, n_boot=50, rng=1)
    assert abs(r["m"] - 0.1) < 3.5 * r["m_err"]
    assert 0.5 < r["m_err_boot"] / r["m_err"] < 2.0


def test_relative_calibration_two_components():
    rng = np.random.default_rng(7)
    x1, y1, sx, sy, sxy = _hogg_data(rng, n=400, slope=1.05, icpt=0.0)
    x2, y2, *_ = _hogg_data(rng, n=400, slope=0.95, icpt=0.005)
    fits_ = relative_calibration(
        np.column_stack([x1, x2]), np.column_stack([y1, y2]),
        np.full((400, 2), sx**2), np.full((400, 2), sy**2), np.full((400, 2), sxy),
    )
    assert len(fits_) == 2
    assert abs(fits_[0]["m"] - 0.05) < 4 * fits_[0]["m_err"]
    assert abs(fits_[1]["m"] + 0.05) < 4 * fits_[1]["m_err"]
    assert abs(fits_[1]["c"] - 0.005) < 4 * fits_[1]["c_err"]


def test_pooled_sigma_source_weights_clusters_by_held_out_galaxies(tmp_path):
    from wlshear.clash.errors import pooled_sigma_source
    from wlshear.metrics.plots import plot_sigma_vs_scale

    rows = [{"sigma_source": [0.20, 0.30], "n_test": 100}, {"sigma_source": [0.30, float("nan")], "n_test": 300},
            None, {"sigma_source": [0.5, 0.5], "n_test": 0}]
    p = pooled_sigma_source(rows)
    # component 1: sqrt((100 * 0.04 + 300 * 0.09) / 400); component 2: the one finite cluster
    assert p["sigma_source"][0] == pytest.approx(np.sqrt((4 + 27) / 400))
    assert p["sigma_source"][1] == pytest.approx(0.30) and np.isnan(p["sigma_source_err"][1])
    w = np.array([0.25, 0.75])
    assert p["sigma_source_err"][0] == pytest.approx(np.sqrt(np.sum(w**2 * (np.array([0.2, 0.3]) - p["sigma_source"][0]) ** 2)))
    assert p["n_clusters"] == [2, 1] and p["n_test"] == 400
    assert pooled_sigma_source([None, {}]) is None
    by_scale = {13.0: {"cnn": {"sigma_source": [0.3, 0.32]}, "baseline": {"sigma_source": [0.35, 0.36]}},
                19.5: {"cnn": {"sigma_source": [0.25, 0.26]}}}
    out = plot_sigma_vs_scale(by_scale, tmp_path / "s.png")
    assert out.is_file() and out.stat().st_size > 1000


def _clustered_points(rng, k=30, m=20, slope=1.1):
    """k clusters of m map points each: the true map t varies from cluster to cluster, and most of
    the error of the points of one cluster is shared (their few galaxies). The per-point variances
    handed to the fit are right (as bootstrap variances are), but the points are not independent."""
    pts = []
    for _ in range(k):
        t = rng.normal(0, 0.05, (1, 2)) + rng.normal(0, 0.02, (m, 2))
        shared = rng.normal(0, 0.02, (1, 2))
        ref = t + rng.normal(0, 0.01, (m, 2))
        est = slope * t + shared + rng.normal(0, 0.01, (m, 2))
        pts.append({"ref": ref, "est": est, "var_ref": np.full((m, 2), 0.01**2),
                    "var_est": np.full((m, 2), 0.02**2 + 0.01**2), "cov": np.zeros((m, 2))})
    return pts


def test_pooled_relative_calibration_errors_from_whole_clusters():
    """Points of one cluster share errors: the fit's own error is several times too small, the
    error from resampling clusters matches the scatter of the fit over independent realisations."""
    from wlshear.clash.errors import pooled_relative_calibration

    rng = np.random.default_rng(11)
    fits_ = pooled_relative_calibration(_clustered_points(rng), n_boot=100, rng=1)
    assert len(fits_) == 2 and all(f["n_clusters"] == 30 for f in fits_)
    m_hat = [pooled_relative_calibration(_clustered_points(rng), n_boot=0)[0]["m"] for _ in range(60)]
    scatter = np.std(m_hat, ddof=1)
    assert abs(np.mean(m_hat) - 0.1) < 3 * scatter / np.sqrt(60)  # the slope itself comes back
    for f in fits_:
        assert f["m_err"] < 0.5 * scatter, (f["m_err"], scatter)
        assert 0.6 < f["m_err_clusters"] / scatter < 1.6, (f["m_err_clusters"], scatter)
        assert f["c_err_clusters"] > f["c_err"]
    # fewer than 3 clusters: the pooled fit, without resampled errors
    two = pooled_relative_calibration(_clustered_points(rng, k=2), n_boot=50)
    assert "m_err_clusters" not in two[0] and two[0]["n_clusters"] == 2
    with pytest.raises(ValueError, match="no cluster"):
        pooled_relative_calibration([], n_boot=10)
