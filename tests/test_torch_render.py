"""The batched torch renderer reproduces the GalSim backend (noiseless, before masking)."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from wlshear.sim.augment import Augmentation
from wlshear.sim.render import StampRenderer, _galsim_backend
from wlshear.sim.sources import CosmosSource, ParametricSource
from wlshear.sim.torch_render import (
    AnalyticGalaxy,
    PreparedGalaxy,
    TorchRenderSettings,
    analytic_from_components,
    analyze_galaxy,
    draw_batch,
    prepared,
    transform_matrices,
)


def _e(img):
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(img, dtype=np.float64)))
    return np.array([res.observed_shape.e1, res.observed_shape.e2])


def _compare(renderer, params):
    g, fg = _galsim_backend(renderer, params, renderer.stamp_size)
    t, ft = draw_batch(renderer, params, renderer.stamp_size)
    assert fg == [] and ft == []
    assert t.shape == g.shape and t.dtype == np.float64
    res = np.abs(t - g).max(axis=(1, 2)) / g.max(axis=(1, 2))
    de = np.array([_e(a) - _e(b) for a, b in zip(t, g)])
    return res, de


def _small_parametric():
    # a small catalogue of modest galaxies keeps the one-time preparation fast
    return ParametricSource(n_galaxies=40, seed=7, hlr_range_px=(1.0, 6.0))


def test_transform_matrix_matches_galsim():
    """A = sqrt(mu) S(g) R(theta) M is GalSim's mirror -> rotate -> lens (checked via jacobian)."""
    r = StampRenderer(_small_parametric(), noise=None)
    p = r.sample_params(np.random.default_rng(0), 5)
    a = transform_matrices(p)
    for i in range(5):
        obj = galsim.Gaussian(sigma=1.0)
        if p.mirror[i]:
            obj = obj.transform(-1.0, 0.0, 0.0, 1.0)
        obj = obj.rotate(float(p.rotation[i]) * galsim.radians).lens(float(p.g1[i]), float(p.g2[i]), float(p.mu[i]))
        np.testing.assert_allclose(obj.jac, a[i], atol=1e-12)


def test_parametric_matches_galsim():
    r = StampRenderer(_small_parametric(), noise=None)  # default training augmentation
    p = r.sample_params(np.random.default_rng(11), 20)
    assert p.mirror.any() and (p.mu != 1).all() and (np.abs(p.dx) > 0).all()
    res, de = _compare(r, p)
    assert res.max() < 0.01, res
    assert np.abs(de).max() < 1e-3, de


def test_analytic_decomposition_matches_galsim_kvalue():
    """Every parametric galaxy (Sersic, bulge + disk, knots, intrinsic shear) decomposes into
    radial components + point sources whose Fourier transform is GalSim's."""
    src = ParametricSource(n_galaxies=30, seed=3, p_knots=0.5)
    rng = np.random.default_rng(0)
    kinds = set()
    for i in range(len(src)):
        gal = src.galaxy(i)
        an = analyze_galaxy(gal)
        assert isinstance(an, AnalyticGalaxy), i
        kinds.add((len(an.tid), len(an.knots_w) > 0))
        k = rng.normal(0, 15.0, (40, 2))  # rad / arcsec
        ref = np.array([gal.kValue(galsim.PositionD(*q)) for q in k])
        np.testing.assert_allclose(an.kvalue(k, TorchRenderSettings()), ref, atol=1e-5 * gal.flux)
    assert {(1, False), (2, False), (1, True), (2, True)} <= kinds  # all morphologies exercised


def test_parametric_components_equal_the_galsim_decomposition():
    """ParametricSource.components (the torch path's description, no GalSim object) gives the same
    AnalyticGalaxy as decomposing the GalSim profile of source.galaxy, every morphology included;
    the torch backend takes it, and knots are refused with a non-Gaussian PSF as before."""
    src = ParametricSource(n_galaxies=60, seed=5, p_knots=0.5, p_bulge_disk=0.5)
    kinds = set()
    for i in range(len(src)):
        fast = analytic_from_components(src.components(i), src.gsparams)
        ref = analyze_galaxy(src.galaxy(i))
        np.testing.assert_array_equal(fast.tid, ref.tid)
        for key in ("jh", "w", "knots_xy", "knots_w"):
            np.testing.assert_allclose(getattr(fast, key), getattr(ref, key), rtol=1e-12, atol=1e-15, err_msg=key)
        kinds.add((len(fast.tid), len(fast.knots_w) > 0))
    assert {(1, False), (2, False), (1, True), (2, True)} <= kinds
    knotty = next(i for i in range(len(src)) if src.catalog["knot_frac"][i] > 0)
    assert analytic_from_components(src.components(knotty), src.gsparams, allow_knots=False) is None
    r = StampRenderer(src, noise=None, backend="torch")
    got = prepared(r, knotty)
    np.testing.assert_allclose(got.knots_xy, analyze_galaxy(src.galaxy(knotty)).knots_xy, rtol=1e-12)


def test_unsupported_profile_uses_generic_path():
    assert analyze_galaxy(galsim.Sersic(n=2, half_light_radius=0.2, trunc=1.0)) is None
    assert analyze_galaxy(galsim.Gaussian(sigma=0.2).shift(0.1, 0.0)) is None
    r = StampRenderer(_small_parametric(), noise=None, backend="torch")
    assert isinstance(prepared(r, 0), AnalyticGalaxy)
    assert isinstance(prepared(r, 0, TorchRenderSettings(analytic=False)), PreparedGalaxy)


def test_knotty_and_generic_path_match_galsim():
    """Knots drawn in real space, and the generic k-grid path (forced), against GalSim."""
    r = StampRenderer(ParametricSource(n_galaxies=6, seed=2, p_knots=1.0, hlr_range_px=(1.0, 5.0)), noise=None)
    p = r.sample_params(np.random.default_rng(4), 6)
    g, _ = _galsim_backend(r, p, r.stamp_size)
    for settings in (TorchRenderSettings(), TorchRenderSettings(analytic=False)):
        t, ft = draw_batch(r, p, r.stamp_size, settings=settings)
        assert ft == []
        res = np.abs(t - g).max(axis=(1, 2)) / g.max(axis=(1, 2))
        de = np.array([_e(a) - _e(b) for a, b in zip(t, g)])
        assert res.max() < 0.01, (settings.analytic, res)
        assert np.abs(de).max() < 1e-3, (settings.analytic, de)


def test_cosmos_real_matches_galsim(cosmos_real_dir):
    r = StampRenderer(CosmosSource(cosmos_real_dir), noise=None)
    p = r.sample_params(np.random.default_rng(3), 10)
    res, de = _compare(r, p)
    assert res.max() < 0.01, res
    assert np.abs(de).max() < 1e-3, de


def test_simulate_same_galaxies_and_shears_as_galsim():
    src = _small_parametric()
    aug = Augmentation()
    a = StampRenderer(src, augment=aug, backend="galsim").simulate(12, seed=5)
    b = StampRenderer(src, augment=aug, backend="torch").simulate(12, seed=5)
    for k in ("galaxy_id", "g1", "g2", "rotation", "mirror", "mu", "dx", "dy"):
        np.testing.assert_array_equal(a.meta[k], b.meta[k])
    assert b.stamps.shape == a.stamps.shape and b.stamps.dtype == np.float32
    # identical noise stream; the noiseless parts agree to < 1% of the peak
    assert np.abs(a.stamps - b.stamps).max() < 0.01 * np.abs(a.stamps).max()


def test_unknown_stamp_size_rejected():
    r = StampRenderer(_small_parametric(), noise=None)
    p = r.sample_params(np.random.default_rng(0), 1)
    with pytest.raises(ValueError, match="period"):
        draw_batch(r, p, 1024)
