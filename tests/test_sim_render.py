"""Science and behaviour checks of the stamp simulator."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from wlshear.sim.augment import Augmentation, StampParams
from wlshear.sim.noise import CorrelatedNoise, load_kernel
from wlshear.sim.render import StampBatch, StampRenderer
from wlshear.sim.sources import GalaxySource, ParametricSource

from conftest import FAST_GSPARAMS


class RoundGaussians(GalaxySource):
    """A test source: round Gaussians of fixed flux and size."""

    name = "round"

    def __init__(self, n=4, hlr_px=3.0, flux=20.0, mask_threshold=None, flux_factor=1.0):
        super().__init__()
        self.catalog = {"mag": np.full(n, 24.0), "mag_source": np.full(n, 24.0), "hlr_px": np.full(n, hlr_px)}
        self._hlr, self._flux = hlr_px * 0.065, flux
        self.mask_threshold, self.flux_factor = mask_threshold, flux_factor

    def _build(self, i):
        return galsim.Gaussian(half_light_radius=self._hlr, flux=self._flux)


def _params(n=1, **kw):
    base = dict(galaxy_id=np.zeros(n, int), g1=np.zeros(n), g2=np.zeros(n), rotation=np.zeros(n),
                mirror=np.zeros(n, bool), mu=np.ones(n), dx=np.zeros(n), dy=np.zeros(n))
    base.update({k: np.atleast_1d(np.asarray(v, dtype=base[k].dtype)) for k, v in kw.items()})
    return StampParams(**base)


def _e(img):
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(img, dtype=np.float64)))
    return res.observed_shape.e1, res.observed_shape.e2


@pytest.fixture
def noiseless():
    return StampRenderer(RoundGaussians(), noise=None, augment=Augmentation().test_mode())


def test_shear_sign_convention(noiseless):
    img_g1, _ = noiseless.draw_noiseless(_params(g1=0.1))
    img_g2, _ = noiseless.draw_noiseless(_params(g2=0.1))
    e1, e2 = _e(img_g1[0])
    assert e1 > 0.05 and abs(e2) < 1e-3  # g1 > 0: elongated along x (axis 1)
    # directly in the array: more flux spread along columns (x) than rows (y)
    prof_x = img_g1[0].sum(axis=0)
    prof_y = img_g1[0].sum(axis=1)
    xs = np.arange(32) - 15.5
    assert np.sum(prof_x * xs**2) > np.sum(prof_y * xs**2)
    e1, e2 = _e(img_g2[0])
    assert e2 > 0.05 and abs(e1) < 1e-3  # g2 > 0: elongated along x = y
    yy, xx = np.mgrid[:32, :32] - 15.5
    assert np.sum(img_g2[0] * xx * yy) > 0


def test_rotation_by_90_flips_both_components():
    src = ParametricSource(n_galaxies=5, p_knots=0.0, seed=3)
    r = StampRenderer(src, noise=None, augment=Augmentation().test_mode(), gsparams=FAST_GSPARAMS)
    # a sheared galaxy rotated by 90 degrees (after shearing, i.e. the whole image) has flipped e
    gal = r.lensed_galaxy(_params(galaxy_id=1, g1=0.15, g2=0.1), 0)
    a = gal.drawImage(nx=32, ny=32, scale=0.065).array
    b = gal.rotate(90 * galsim.degrees).drawImage(nx=32, ny=32, scale=0.065).array
    (ea1, ea2), (eb1, eb2) = _e(a), _e(b)
    assert eb1 == pytest.approx(-ea1, abs=2e-3) and eb2 == pytest.approx(-ea2, abs=2e-3)
    assert abs(ea1) > 0.05
    # and the array view: rot90 of the stamp equals the rotated drawing
    np.testing.assert_allclose(np.rot90(a), b, atol=1e-3 * a.max())


def test_centre_and_shift(noiseless):
    img, _ = noiseless.draw_noiseless(_params(dx=2.0, dy=-1.0))
    yy, xx = np.mgrid[:32, :32]
    w = img[0] / img[0].sum()
    assert np.sum(w * xx) == pytest.approx(15.5 + 2.0, abs=0.02)
    assert np.sum(w * yy) == pytest.approx(15.5 - 1.0, abs=0.02)


def test_noise_covariance_matches_kernel_autocorrelation():
    noise = CorrelatedNoise(None, 1.0)
    rng = np.random.default_rng(0)
    n = noise.sample(rng, 3000, (32, 32)).astype(np.float64)
    c_th = noise.covariance(max_lag=2)
    c0 = c_th[2, 2]
    assert c0 == pytest.approx(noise.sigma**2)
    for dy in range(0, 3):
        for dx in range(-2, 3):
            a = n[:, : 32 - dy, max(0, -dx): 32 - max(0, dx)]
            b = n[:, dy:, max(0, dx): 32 + min(0, dx)]
            emp = np.mean(a * b)
            th = c_th[2 + dy, 2 + dx]
            if abs(th) > 0.05 * c0:
                assert emp == pytest.approx(th, rel=0.05), (dy, dx)
            else:
                assert abs(emp - th) < 0.01 * c0
    assert noise.sigma == pytest.approx(3.60e-3, rel=2e-3)
    assert CorrelatedNoise(None, 0.5).sigma == pytest.approx(0.5 * noise.sigma)


def test_kernel_file_roundtrip(tmp_path):
    k = load_kernel()
    assert k.shape == (7, 7) and k.sum() == pytest.approx(5.81e-3, rel=1e-3)
    np.save(tmp_path / "k.npy", 2 * k)
    assert CorrelatedNoise(tmp_path / "k.npy").sigma == pytest.approx(2 * CorrelatedNoise().sigma)
    with pytest.raises(FileNotFoundError):
        load_kernel(tmp_path / "missing.npy")
    np.save(tmp_path / "even.npy", np.ones((6, 6)))
    with pytest.raises(ValueError, match="odd"):
        load_kernel(tmp_path / "even.npy")


def test_mask_threshold_and_flux_factor():
    src = RoundGaussians(hlr_px=4.0, flux=5.0, mask_threshold=0.012, flux_factor=0.3203)
    r = StampRenderer(src, noise=None, augment=Augmentation().test_mode())
    img, _ = r.draw_noiseless(_params())
    nz = img[0][img[0] != 0]
    assert (img[0] == 0).sum() > 100  # the faint wings were masked
    assert nz.min() >= 0.012 * 0.3203 * (1 - 1e-9)
    raw = r.draw_galsim(_params(), 0).array
    keep = raw >= 0.012
    np.testing.assert_allclose(img[0][keep], raw[keep] * 0.3203, rtol=1e-6)


def test_same_seed_same_stamps_and_augmentation_ranges():
    src = ParametricSource(n_galaxies=50, p_knots=0.0, seed=1)
    r = StampRenderer(src, noise=CorrelatedNoise(), gsparams=FAST_GSPARAMS)
    a = r.simulate(40, 5)
    b = r.simulate(40, 5)
    c = r.simulate(40, 6)
    np.testing.assert_array_equal(a.stamps, b.stamps)
    assert not np.allclose(a.stamps, c.stamps)
    m = a.meta
    assert np.all(np.abs(m["g1"]) <= 0.2) and np.all(np.abs(m["g2"]) <= 0.2)
    assert np.all(np.abs(m["dx"]) <= 3.5) and np.all((m["mu"] >= 0.925) & (m["mu"] <= 1.075))
    assert m["mirror"].any() and not m["mirror"].all()
    t = r.with_augment(r.augment.test_mode()).simulate(40, 5)
    assert np.all(t.meta["dx"] == 0) and np.all(t.meta["mu"] == 1)
    assert np.all(np.isfinite(a.meta["snr"])) and np.all(a.meta["snr"] > 0)


def test_ring_pairs_share_shear_and_differ_by_90_degrees():
    src = ParametricSource(n_galaxies=50, p_knots=0.0, seed=1)
    r = StampRenderer(src, noise=None, augment=Augmentation().test_mode(), gsparams=FAST_GSPARAMS)
    b = r.simulate(20, 3, ring=True)
    m = b.meta
    for pid in np.unique(m["pair_id"]):
        i, j = np.nonzero(m["pair_id"] == pid)[0]
        assert m["g1"][i] == m["g1"][j] and m["galaxy_id"][i] == m["galaxy_id"][j]
        assert (m["rotation"][j] - m["rotation"][i]) % (2 * np.pi) == pytest.approx(np.pi / 2)


def test_failed_galaxy_is_skipped_and_recorded():
    class Broken(RoundGaussians):
        def _build(self, i):
            if i == 1:
                raise galsim.GalSimError("boom")
            return super()._build(i)

    r = StampRenderer(Broken(n=2), noise=CorrelatedNoise(), augment=Augmentation().test_mode())
    p = _params(n=4, galaxy_id=[0, 1, 0, 1])
    b = r.render(p, np.random.default_rng(0))
    assert len(b) == 2 and len(b.failures) == 2
    assert all(gid == 1 and "boom" in msg for gid, msg in b.failures)
    assert set(b.meta["galaxy_id"]) == {0}


def test_stamp_batch_roundtrip(tmp_path):
    src = ParametricSource(n_galaxies=20, p_knots=0.0, seed=1)
    b = StampRenderer(src, noise=CorrelatedNoise(), gsparams=FAST_GSPARAMS).simulate(6, 1)
    for suffix in (".npz", ".fits"):
        c = StampBatch.load(b.save(tmp_path / f"s{suffix}"))
        np.testing.assert_array_equal(c.stamps, b.stamps)
        np.testing.assert_allclose(c.meta["g1"], b.meta["g1"])
    with pytest.raises(ValueError, match="unsupported"):
        b.save(tmp_path / "s.txt")


def test_parametric_population_resembles_clash():
    src = ParametricSource(n_galaxies=20000, seed=0)
    mag, hlr = src.catalog["mag"], src.catalog["hlr_px"]
    assert 22 <= mag.min() and mag.max() <= 27 and abs(mag.mean() - 24.5) < 0.2
    assert 1 <= hlr.min() and hlr.max() <= 25
    assert np.corrcoef(mag, np.log(hlr))[0, 1] < -0.2  # brighter galaxies are larger
    with pytest.raises(ValueError, match="n_knots"):
        ParametricSource(n_knots=30)


def test_render_cli_writes_stamps_and_grid(tmp_path):
    from wlshear.tasks.render import main

    out = tmp_path / "st.fits"
    assert main(["n=8", f"out={out}", "test_mode=true", "seed=2"]) == 0
    b = StampBatch.load(out)
    assert b.stamps.shape == (8, 32, 32) and np.all(b.meta["dx"] == 0)
    assert (tmp_path / "st.png").stat().st_size > 1000


def test_parallel_rendering_gives_the_same_stamps():
    src = ParametricSource(n_galaxies=30, p_knots=0.0, seed=1)
    r = StampRenderer(src, noise=CorrelatedNoise(), gsparams=FAST_GSPARAMS)
    a = r.simulate(24, 9, chunk=8)
    b = r.simulate(24, 9, chunk=8, workers=2)
    np.testing.assert_array_equal(a.stamps, b.stamps)
    np.testing.assert_array_equal(a.meta["galaxy_id"], b.meta["galaxy_id"])


def test_shifted_sets_follow_the_paper_or_the_direction_distribution():
    """simulate_shifted: 'uniform' draws dx, dy uniform per axis over a total extent s x hlr (the
    paper's); 'direction' a fixed length s x hlr. Ring pairs share their shift."""
    from wlshear.sim.render import StampRenderer
    from wlshear.sim.sources import ParametricSource

    r = StampRenderer(ParametricSource(n_galaxies=30, p_knots=0.0, seed=2, hlr_range_px=(1.0, 4.0)), noise=None,
                      backend="torch")
    s = 0.8
    for dist in ("uniform", "direction"):
        b = r.simulate_shifted(400, seed=3, shift_hlr=s, ring=True, distribution=dist)
        hlr = b.meta["hlr_px"]  # magnified half-light radius [px]
        u = np.stack([b.meta["dx"], b.meta["dy"]], 1) / (s * hlr[:, None])
        pid = b.meta["pair_id"]
        for p in np.unique(pid)[:20]:
            assert np.allclose(u[pid == p], u[pid == p][0])
        if dist == "uniform":
            assert np.all(np.abs(u) <= 0.5 + 1e-12) and np.abs(u).max() > 0.45
            assert np.std(u[:, 0]) == pytest.approx(1 / np.sqrt(12), rel=0.15)
        else:
            np.testing.assert_allclose(np.hypot(u[:, 0], u[:, 1]), 1.0, atol=1e-9)
    with pytest.raises(ValueError, match="uniform' or 'direction"):
        r.simulate_shifted(10, seed=3, shift_hlr=s, distribution="gauss")
