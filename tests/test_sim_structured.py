"""The structured population: one description for both backends, and the shapes it promises
(inclined thick disks, rounder roughly aligned bulges, knots and arms in the disk plane)."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from wlshear.sim.render import StampRenderer, _galsim_backend
from wlshear.sim.sources import shear_matrix
from wlshear.sim.structured import (
    StructuredSource,
    axis_ratio_to_g,
    disk_plane_points,
    inclined_disk_q,
    profile_from_components,
)
from wlshear.sim.torch_render import AnalyticGalaxy, TorchRenderSettings, analytic_from_components, draw_batch, prepared
from wlshear.utils.hydra import compose_config


def _kinds(src, i):
    c = src.catalog
    return (bool(c["bulge_disk"][i]), bool(c["disky"][i]), bool(c["knot_frac"][i] > 0), bool(c["arms"][i]))


def test_galsim_profile_is_the_components_description():
    """source.galaxy (the GalSim backend) has the Fourier transform of source.components (the
    torch backend) for every morphology: bulge + disk, disky and spheroidal Sersic, clumps, arms."""
    src = StructuredSource(n_galaxies=80, seed=4, p_knots=0.7)
    rng = np.random.default_rng(1)
    seen = set()
    for i in range(len(src)):
        gal = src.galaxy(i)
        an = analytic_from_components(src.components(i), src.gsparams)
        k = rng.normal(0, 15.0, (30, 2))  # rad / arcsec
        ref = np.array([gal.kValue(galsim.PositionD(*q)) for q in k])
        np.testing.assert_allclose(an.kvalue(k, TorchRenderSettings()), ref, atol=1e-5 * gal.flux)
        assert gal.flux == pytest.approx(10 ** (-0.4 * (src.catalog["mag"][i] - src.zeropoint)), rel=1e-9)
        seen.add(_kinds(src, i))
    assert {(True, True, True, True), (True, True, True, False), (False, True, False, False),
            (False, False, False, False)} <= seen, seen


def test_backends_agree_on_stamps():
    src = StructuredSource(n_galaxies=40, seed=7, hlr_range_px=(1.0, 6.0), p_knots=1.0)
    r = StampRenderer(src, noise=None)
    p = r.sample_params(np.random.default_rng(11), 24)
    g, fg = _galsim_backend(r, p, r.stamp_size)
    t, ft = draw_batch(r, p, r.stamp_size)
    assert fg == [] and ft == []
    res = np.abs(t - g).max(axis=(1, 2)) / g.max(axis=(1, 2))
    assert res.max() < 0.01, res
    assert isinstance(prepared(StampRenderer(src, noise=None, backend="torch"), 0), AnalyticGalaxy)


def test_inclined_disk_axis_ratio():
    assert inclined_disk_q(1.0, 0.2) == pytest.approx(1.0)
    assert inclined_disk_q(0.0, 0.2) == pytest.approx(0.2)
    # cos i ~ U(0, 1) with q0 = 0: q is uniform, so its median is 0.5
    assert np.median(inclined_disk_q(np.random.default_rng(0).uniform(0, 1, 200_000), 0.0)) == pytest.approx(0.5, abs=0.01)
    assert axis_ratio_to_g(1 / 3) == pytest.approx(0.5)


def test_shapes_follow_the_model():
    src = StructuredSource(n_galaxies=20_000, seed=1, disk_thickness=0.2, disk_thickness_sd=0.0,
                           spheroid_q_range=(0.6, 1.0), bulge_pa_sigma_deg=20.0)
    c = src.catalog
    gd = np.hypot(c["disk_e1"], c["disk_e2"])
    disky = c["disky"]
    # no disk is flatter than its thickness, and face-on disks (q -> 1) are common
    assert gd[disky].max() <= axis_ratio_to_g(0.2) + 1e-9
    assert np.mean(gd[disky] < 0.05) > 0.05
    # spheroids and bulges are rounder than q = 0.6
    bd = c["bulge_disk"]
    gb = np.hypot(c["bulge_e1"][bd], c["bulge_e2"][bd])
    assert gb.max() <= axis_ratio_to_g(0.6) + 1e-9 and gd[~disky].max() <= axis_ratio_to_g(0.6) + 1e-9
    # a bulge's position angle follows its disk's (20 deg rms offset) where both are elongated
    el = bd & (gd > 0.2)
    el_b = np.hypot(c["bulge_e1"], c["bulge_e2"])[el] > 0.1
    dpa = 0.5 * np.angle(np.exp(1j * (np.arctan2(c["bulge_e2"], c["bulge_e1"]) - np.arctan2(c["disk_e2"], c["disk_e1"]))))
    assert np.degrees(np.std(dpa[el][el_b])) == pytest.approx(20.0, rel=0.1)
    # the single-Sersic index histogram is the configured (COSMOS) one
    ns = c["sersic_n"][~bd]
    assert np.mean(ns == 1.0) == pytest.approx(91 / 276, abs=0.02)


def test_knots_lie_in_the_disk_plane():
    """De-projected with the inverse of the disk's shape, the knots of inclined disks are round on
    average: they are projected (and later sheared) with the disk."""
    src = StructuredSource(n_galaxies=3000, seed=2, p_knots=1.0, p_bulge_disk=1.0)
    c = src.catalog
    rot_q = []
    for i in np.flatnonzero(np.hypot(c["disk_e1"], c["disk_e2"]) > 0.3)[:300]:
        d = src.components(i)
        s = shear_matrix(float(c["disk_e1"][i]), float(c["disk_e2"][i]))
        xy = d["knots_xy"]
        u = xy @ np.linalg.inv(s).T  # de-projected
        assert len(xy) == src.n_knots and np.isclose(d["knots_w"].sum(), 10 ** (-0.4 * (c["mag"][i] - src.zeropoint)) * (1 - c["bulge_frac"][i]) * c["knot_frac"][i])

        def e(p):
            m = p.T @ p
            return (m[0, 0] - m[1, 1]) / (m[0, 0] + m[1, 1]), 2 * m[0, 1] / (m[0, 0] + m[1, 1])
        rot_q.append((e(xy), e(u), (float(c["disk_e1"][i]), float(c["disk_e2"][i]))))
    proj = np.array([a for a, _, _ in rot_q])
    flat = np.array([b for _, b, _ in rot_q])
    disk = np.array([g for _, _, g in rot_q])
    # projected knot patterns align with their disk, de-projected ones do not
    assert np.mean(np.sum(proj * disk, axis=1)) > 0.05
    assert abs(np.mean(np.sum(flat * disk, axis=1))) < 0.3 * np.mean(np.sum(proj * disk, axis=1))


def test_arm_points_follow_log_spirals():
    rng = np.random.default_rng(0)
    pitch = np.radians(20.0)
    p = disk_plane_points(rng, 4000, True, 2, pitch, width=0.0)
    r, th = np.hypot(*p.T), np.arctan2(p[:, 1], p[:, 0])
    # theta - ln(r)/tan(pitch) takes only n_arms = 2 values, pi apart, without scatter
    z = np.exp(2j * (th - np.log(r) / np.tan(pitch)))
    np.testing.assert_allclose(z, z[0], atol=1e-9)
    q = disk_plane_points(rng, 4000, False, 2, pitch, width=0.0)  # clumps: no such pattern
    th, r = np.arctan2(q[:, 1], q[:, 0]), np.hypot(*q.T)
    assert abs(np.mean(np.exp(2j * (th - np.log(r) / np.tan(pitch))))) < 0.05
    # radii follow the exponential disk: half the points within the half-light radius (units of it)
    assert np.median(r) == pytest.approx(1.0, abs=0.05)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="sersic_weights"):
        StructuredSource(n_galaxies=10, sersic_weights=(1, 2))
    with pytest.raises(ValueError, match="n_knots"):
        StructuredSource(n_galaxies=10, n_knots=0)
    with pytest.raises(ValueError, match="kind"):
        profile_from_components({"radial": [("moffat", 0, np.eye(2), 1.0)], "knots_xy": [], "knots_w": []})


def test_config_builds_the_structured_source():
    from hydra.utils import instantiate

    cfg = compose_config("train", ["data/source=structured", "debug=fast"])
    src = instantiate(cfg.data.source)
    assert isinstance(src, StructuredSource) and len(src) == 200 and src.catalog["knot_frac"].max() == 0
    cfg = compose_config("train", ["experiment=structured_scale"])
    assert cfg.data.source._target_.endswith("StructuredSource") and cfg.data.backend == "torch"
    assert cfg.model.scheduler._target_.endswith("CosineAnnealingLR") and "mode" not in cfg.model.scheduler
