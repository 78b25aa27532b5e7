"""Mock CLASH field: files, WCS, combination by wlshear.clash.io, truth and baseline catalogue."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from wlshear.clash.io import DEFAULT_FILTERS, SCI_PATTERN, WHT_PATTERN, celestial_wcs, load_field, read_catalogue
from wlshear.clash.lensing import nfw_magnification
from wlshear.clash.mock import MockConfig, add_stamps, make_mock_field, sample_positions
from wlshear.tasks.mock_field import main


@pytest.fixture(scope="module")
def mock_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("mock_small")
    cfg = MockConfig(cluster="tiny", size=300, n_galaxies=60, n_stars=4, min_sep_px=14, n_calib=60,
                     m200=8e14, seed=3, progress=False)
    return cfg, make_mock_field(cfg, out), out


def test_mock_writes_files_with_wcs(mock_small):
    cfg, summary, out = mock_small
    for filt in DEFAULT_FILTERS:
        for pat in (SCI_PATTERN, WHT_PATTERN):
            p = out / pat.format(cluster="tiny", filter=filt)
            assert p.is_file(), p
            with fits.open(p) as h:
                assert h[0].data.shape == (300, 300)
                wcs = celestial_wcs(h[0].header, p)
    # 0.065"/px, north up (dec grows with y), east left (ra decreases with x)
    scale = np.abs(wcs.pixel_scale_matrix.diagonal()) * 3600
    np.testing.assert_allclose(scale, 0.065, rtol=1e-9)
    ra0, dec0 = wcs.pixel_to_world_values(149.5, 149.5)
    ra1, dec1 = wcs.pixel_to_world_values(149.5, 159.5)
    ra2, _ = wcs.pixel_to_world_values(159.5, 149.5)
    assert dec1 > dec0 and ra2 < ra0
    np.testing.assert_allclose([ra0, dec0], [cfg.ra0, cfg.dec0], atol=1e-9)
    s = json.loads((out / "tiny_mock.json").read_text())
    assert s["n_galaxies"] == 60 and s["n_stars"] == 4
    assert s["truth"]["m200"] == 8e14 and s["baseline_calibration"]["n"] > 0


def test_combined_field_reproduces_total_and_flags_regions(mock_small):
    cfg, summary, out = mock_small
    field = load_field(out, "tiny")
    assert field.filters == list(DEFAULT_FILTERS) and not field.missing_filters
    assert np.isfinite(field.image).all() and np.isfinite(field.ivar).all()
    # the combined ivar is the intended total ivar 1/sigma^2 (x depth in the shallow region)
    good = ~field.bad
    reg = summary["regions"]
    xs0, ys0, xs1, ys1 = reg["shallow"]
    shallow = np.zeros(field.shape, bool)
    shallow[ys0:ys1, xs0:xs1] = True
    np.testing.assert_allclose(field.ivar[good & ~shallow], summary["ivar_nominal"], rtol=1e-5)
    np.testing.assert_allclose(field.ivar[good & shallow], summary["ivar_nominal"] * cfg.shallow_depth, rtol=1e-5)
    assert summary["ivar_nominal"] > 5e4 > summary["ivar_nominal"] * cfg.shallow_depth
    # masked (weight < 100 in one filter) and NaN regions are flagged bad, and nothing else
    expect = np.zeros(field.shape, bool)
    for key in ("masked", "nan"):
        x0, y0, x1, y1 = reg[key]
        assert field.bad[y0:y1, x0:x1].all(), key
        expect[y0:y1, x0:x1] = True
    assert (field.bad == expect).all()
    assert (field.image[field.bad] == 0).all()
    # image = same science data in every filter: the mean equals any filter where not bad
    with fits.open(out / SCI_PATTERN.format(cluster="tiny", filter="f814w")) as h:
        np.testing.assert_allclose(field.image[good], h[0].data[good], rtol=1e-6)
    # the noise level in empty sky matches 1/sqrt(ivar)
    truth = Table.read(out / "tiny_truth.fits")
    assert np.std(field.image[good & ~shallow]) > 0.8 / np.sqrt(summary["ivar_nominal"])


def test_truth_and_baseline_catalogue(mock_small):
    cfg, summary, out = mock_small
    truth = Table.read(out / "tiny_truth.fits")
    for col in ("x", "y", "ra", "dec", "g1", "g2", "kappa", "mag", "hlr", "is_star", "mu", "in_mask"):
        assert col in truth.colnames, col
    assert truth["is_star"].sum() == 4 and len(truth) == 64
    gal = ~truth["is_star"]
    # NFW: tangential (g_t > 0) reduced shear, weak enough to render; magnification > 1
    from wlshear.clash.lensing import tangential_cross

    c = summary["center"]
    gt, gx = tangential_cross(truth["g1"][gal], truth["g2"][gal], truth["x"][gal] - c[0], truth["y"][gal] - c[1])
    assert (gt > 0).all() and np.abs(gx).max() < 1e-10
    assert (np.hypot(truth["g1"], truth["g2"]) < cfg.g_max).all()
    assert (truth["mu"][gal] > 1).all() and (truth["kappa"][gal] > 0).all()
    np.testing.assert_allclose(truth["mu"][gal], nfw_magnification(truth["g1"][gal], truth["g2"][gal], truth["kappa"][gal]))
    # sky positions agree with the WCS
    field = load_field(out, "tiny")
    ra, dec = field.wcs.pixel_to_world_values(truth["x"], truth["y"])
    np.testing.assert_allclose(ra, truth["ra"], atol=1e-10)
    # the baseline catalogue is readable by the pipeline and holds galaxies only (no masked ones)
    cat = read_catalogue(out / "tiny_wl_catalogue.fits")
    assert {"ra", "dec", "g1", "g2"} <= set(cat.colnames)
    assert 0.5 * gal.sum() < len(cat) <= gal.sum()
    ids = np.asarray(cat["ID"])
    assert not truth["is_star"][ids].any() and not truth["in_mask"][ids].any()
    assert np.isfinite(cat["g1"]).all()


def test_flux_in_image_matches_truth_magnitudes(mock_small):
    cfg, summary, out = mock_small
    truth = Table.read(out / "tiny_truth.fits")
    field = load_field(out, "tiny")
    # the brightest star's flux in an 11 px box equals its magnitude (PSF sigma 0.8 px; noise and
    # neighbours, >= 14 px away, are negligible)
    s = np.flatnonzero(truth["is_star"] & ~truth["in_mask"])
    k = s[np.argmin(truth["mag"][s])]
    x, y = int(round(truth["x"][k])), int(round(truth["y"][k]))
    if 5 <= x < 295 and 5 <= y < 295:
        flux = field.image[y - 5 : y + 6, x - 5 : x + 6].sum()
        expect = 10 ** (-0.4 * (truth["mag"][k] - 25.4193))
        assert flux == pytest.approx(expect, rel=0.05)


def test_helpers_and_cli_errors(tmp_path):
    rng = np.random.default_rng(0)
    xy = sample_positions(rng, 50, (100, 100), 8.0)
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    assert d[~np.eye(50, dtype=bool)].min() >= 8.0
    with pytest.raises(ValueError, match="could only place"):
        sample_positions(rng, 500, (50, 50), 10.0, max_tries=3)
    img = np.zeros((10, 10))
    add_stamps(img, np.ones((1, 4, 4)), np.array([0.0]), np.array([9.0]))  # clipped at the corner
    assert img.sum() == 6 and img[8:, :3].all()
    with pytest.raises(ValueError, match="masked_filter"):
        make_mock_field(MockConfig(masked_filter="f999w", size=100, n_galaxies=1, progress=False), tmp_path)
    assert main([f"out={tmp_path}", "mock.center=[1,2,3]"]) == 2


def test_source_density_follows_the_paper_by_default():
    """conf/mock_field.yaml: 37 sources per arcmin^2 (the paper's CLASH density); the number of
    galaxies follows the field area; an explicit n_galaxies wins; without either the old ~470."""
    from wlshear.utils.hydra import compose_config

    mock = dict(compose_config("mock_field", ["out=x"]).mock)
    assert mock["density_per_arcmin2"] == 37.0 and mock["n_galaxies"] is None
    cfg = MockConfig(size=2000, density_per_arcmin2=37.0, progress=False)
    assert cfg.n_gal() == round(37.0 * (2000 * 0.065 / 60) ** 2) == 174
    assert MockConfig(size=2000, density_per_arcmin2=37.0, n_galaxies=10).n_gal() == 10
    assert MockConfig(size=1200).n_gal() == 800
