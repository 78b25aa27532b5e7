"""Bias fit, calibration and ring-pair averaging on synthetic data with known m and c."""

import numpy as np
import pytest

from wlshear.metrics.bias import average_pairs, calibrate, fit_bias, fit_line


def _synthetic(n, m, c, noise, rng):
    g = rng.uniform(-0.2, 0.2, (n, 2))
    est = (1 + np.asarray(m)) * g + np.asarray(c) + rng.normal(0, noise, (n, 2))
    return g, est


def test_fit_recovers_injected_bias_within_errors():
    rng = np.random.default_rng(1)
    m, c = np.array([0.08, -0.05]), np.array([0.003, -0.002])
    g, est = _synthetic(20000, m, c, 0.25, rng)
    fit = fit_bias(g, est)
    assert fit.n == 20000 and fit.n_failed == 0
    assert np.all(np.abs(fit.m - m) < 3 * fit.m_err)
    assert np.all(np.abs(fit.c - c) < 3 * fit.c_err)
    # expected OLS error: noise / (sqrt(n) * std(g)), std of U(-0.2, 0.2) = 0.2/sqrt(3)
    expected_m_err = 0.25 / (1 + m) / np.sqrt(20000) / (0.2 / np.sqrt(3))
    assert np.allclose(fit.m_err * 1.0, expected_m_err * (1 + m), rtol=0.1)
    assert np.allclose(fit.c_err, 0.25 / np.sqrt(20000), rtol=0.1)
    # calibrated RMS equals the noise divided by the response
    assert np.allclose(fit.sigma, 0.25 / (1 + m), rtol=0.03)


def test_errors_match_scatter_of_repeated_fits_and_bootstrap():
    rng = np.random.default_rng(2)
    ms, errs = [], []
    for _ in range(200):
        g, est = _synthetic(500, 0.1, 0.0, 0.2, rng)
        f = fit_bias(g, est)
        ms.append(f.m[0])
        errs.append(f.m_err[0])
    assert np.std(ms) == pytest.approx(np.mean(errs), rel=0.2)
    g, est = _synthetic(2000, 0.1, 0.0, 0.2, rng)
    a = fit_bias(g, est)
    b = fit_bias(g, est, bootstrap=200, rng=3)
    assert np.allclose(b.m_err, a.m_err, rtol=0.3)
    assert np.allclose(b.sigma_err, a.sigma_err, rtol=0.3)
    np.testing.assert_allclose(b.m, a.m)


def test_failed_and_nan_rows_are_excluded_and_counted():
    rng = np.random.default_rng(3)
    g, est = _synthetic(1000, 0.0, 0.0, 0.05, rng)
    failed = np.zeros(1000, bool)
    failed[:10] = True
    est[:10] = 100.0  # garbage in flagged rows must not matter
    est[10:15, 1] = np.nan
    fit = fit_bias(g, est, failed=failed)
    assert fit.n_failed == 15 and fit.n == 985
    assert np.all(np.abs(fit.m) < 4 * fit.m_err)
    d = fit.as_dict()
    assert set(["m1", "m1_err", "c2_err", "sigma2", "sigma2_err", "n", "n_failed"]) <= set(d)


def test_calibrate_inverts_bias():
    g = np.array([[0.1, -0.1], [0.0, 0.05]])
    m, c = np.array([0.2, -0.1]), np.array([0.01, 0.02])
    np.testing.assert_allclose(calibrate((1 + m) * g + c, m, c), g)


def test_fit_line_degenerate_inputs_give_nan():
    assert np.isnan(fit_line([1.0, 2.0], [1.0, 2.0])[0])
    assert np.isnan(fit_line([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])[0])


def test_ring_pairs_cancel_shape_noise():
    rng = np.random.default_rng(4)
    npair = 2000
    g = rng.uniform(-0.2, 0.2, (npair, 2))
    e_int = rng.normal(0, 0.25, (npair, 2))
    gt = np.repeat(g, 2, axis=0)
    e = np.repeat(e_int, 2, axis=0)
    e[1::2] *= -1  # the 90-degree rotated copy has the opposite intrinsic ellipticity
    est = 1.1 * gt + e + rng.normal(0, 0.02, (2 * npair, 2))
    ids = np.repeat(np.arange(npair), 2)
    single = fit_bias(gt, est)
    paired = fit_bias(gt, est, pair_ids=ids)
    assert paired.paired and paired.n == npair
    assert np.all(paired.sigma < 0.2 * single.sigma)
    assert np.all(paired.m_err < 0.2 * single.m_err)
    assert np.all(np.abs(paired.m - 0.1) < 3 * paired.m_err)
    # a failed member removes its whole pair
    failed = np.zeros(2 * npair, bool)
    failed[1] = True
    _, _, bad = average_pairs(gt, est, ids, failed)
    assert bad.sum() == 1 and bad[0]
    assert fit_bias(gt, est, failed=failed, pair_ids=ids).n_failed == 1


def test_pairs_with_different_true_shear_are_rejected():
    gt = np.array([[0.1, 0.0], [0.2, 0.0]])
    with pytest.raises(ValueError, match="same true shear"):
        average_pairs(gt, gt, [0, 0])


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        fit_bias(np.zeros(5), np.zeros(5))
