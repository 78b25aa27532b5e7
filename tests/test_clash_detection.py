"""Detection, matching, selection cuts and stamps on a synthetic field with injected sources."""

import math

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS
from scipy.special import erf

from wlshear.clash.cuts import (
    CUT_BAD_PIXELS,
    CUT_EDGE,
    CUT_LOW_IVAR,
    CUT_STAR,
    apply_cuts,
    classify_stars,
)
from wlshear.clash.detection import detect_sources, match_catalogue
from wlshear.clash.stamps import STAMP_EDGE, STAMP_EMPTY, extract_stamps
from wlshear.metrics.plots import plot_star_galaxy

ZP = 25.4193
NOISE = 0.0036  # counts, ~ the CLASH total-image per-pixel sigma
PSF_SIGMA = 0.121 / 0.065 / 2.3548


def _gauss(shape, x0, y0, sigma, flux):
    """Pixel-integrated circular Gaussian (exact pixel response), 0-indexed centre (x0, y0)."""
    ny, nx = shape
    s = sigma * math.sqrt(2)
    ex = np.diff(erf((np.arange(nx + 1) - 0.5 - x0) / s)) / 2
    ey = np.diff(erf((np.arange(ny + 1) - 0.5 - y0) / s)) / 2
    return flux * np.outer(ey, ex)


def _wcs(shape):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [64.03, -24.07]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cdelt = [-0.065 / 3600, 0.065 / 3600]
    return w


def _mag2flux(m):
    return 10 ** (-0.4 * (m - ZP))


@pytest.fixture(scope="module")
def field():
    rng = np.random.default_rng(42)
    shape = (700, 700)
    img = rng.normal(0, NOISE, shape)
    # a regular grid of positions, shuffled between stars and galaxies
    gx, gy = np.meshgrid(np.arange(60, 660, 60.0), np.arange(60, 660, 60.0))
    pos = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-5, 5, (gx.size, 2))
    rng.shuffle(pos)
    n_star = 35
    kind = np.array(["star"] * n_star + ["gal"] * (len(pos) - n_star))
    mag = np.where(kind == "star", rng.uniform(20.5, 24.0, len(pos)), rng.uniform(21.0, 24.0, len(pos)))
    size = np.where(kind == "star", PSF_SIGMA, rng.uniform(2.5, 4.5, len(pos)))
    for (x, y), m, s in zip(pos, mag, size):
        img += _gauss(shape, x, y, s, _mag2flux(m))
    # an edge source
    img += _gauss(shape, 6.0, 350.0, 3.0, _mag2flux(22.0))
    ivar = np.full(shape, 1 / NOISE**2)
    bad = np.zeros(shape, bool)
    bad[:, 600:603] = True  # a bad column strip
    ivar[20:150, 20:150] = 1e4  # shallow corner
    img[bad] = 0.0
    ivar[bad] = 0.0
    truth = Table({"x": pos[:, 0], "y": pos[:, 1], "mag": mag, "kind": kind})
    # FITS data is big-endian: the detection must cope
    return {"image": img.astype(">f4"), "ivar": ivar.astype(">f4"), "bad": bad, "wcs": _wcs(shape), "truth": truth}


@pytest.fixture(scope="module")
def detections(field):
    return detect_sources(field["image"], field["ivar"], field["bad"], field["wcs"])


def _nearest(det, x, y):
    d = np.hypot(det["x"][:, None] - x[None], det["y"][:, None] - y[None])
    return np.argmin(d, axis=0), np.min(d, axis=0)


def test_detection_positions_and_magnitudes(field, detections):
    det, truth = detections, field["truth"]
    for col in ("x", "y", "ra", "dec", "flux", "mag", "flux_radius", "mu_max", "flags"):
        assert col in det.colnames
    i, d = _nearest(det, np.asarray(truth["x"]), np.asarray(truth["y"]))
    star = np.asarray(truth["kind"] == "star")
    clear = np.abs(np.asarray(truth["x"]) - 601) > 15  # away from the bad strip
    assert np.all(d[star & clear] < 0.1)  # bright compact sources: precise centroids
    assert np.median(d[clear]) < 0.1 and np.all(d[clear] < 1.0)  # faint extended: noisier
    dm = (det["mag"][i] - truth["mag"])[clear]
    assert abs(np.median(dm)) < 0.05 and np.all(np.abs(dm) < 0.15)
    # WCS: sky positions consistent with the pixel positions
    ra, dec = field["wcs"].pixel_to_world_values(det["x"][i], det["y"][i])
    np.testing.assert_allclose(det["ra"][i], ra)
    # point sources: half-light radius ~ PSF (0.93 px); galaxies larger
    assert abs(np.median(det["flux_radius"][i][star]) - 0.93) < 0.15
    assert np.all(det["flux_radius"][i][~star] > 2.0)


def test_match_catalogue(field, detections):
    truth = field["truth"]
    ra, dec = field["wcs"].pixel_to_world_values(truth["x"], truth["y"])
    cat = Table({"ra": ra, "dec": dec})
    idx, sep_arcsec, matched = match_catalogue(detections, cat, radius_arcsec=0.65)
    assert idx.shape == (len(detections),)
    i, d = _nearest(detections, np.asarray(truth["x"]), np.asarray(truth["y"]))
    assert matched[i].all() and np.all(idx[i] == np.arange(len(truth)))
    np.testing.assert_allclose(sep_arcsec[i], 0.065 * d, rtol=1e-3, atol=1e-6)
    # far-away catalogue: nothing matches
    far = Table({"ra": ra + 1.0, "dec": dec})
    assert not match_catalogue(detections, far)[2].any()
    with pytest.raises(ValueError, match="ra"):
        match_catalogue(detections, Table({"x": [1.0]}))


def test_cuts_flags_and_star_galaxy(field, detections, tmp_path):
    det, truth = detections, field["truth"]
    flags, summary = apply_cuts(det, field["image"].shape, field["bad"], field["ivar"])
    assert summary["n_total"] == len(det)
    assert summary["n_selected"] == int((flags == 0).sum())
    assert summary["n_star"] > 0 and summary["n_edge"] > 0 and summary["n_bad_pixels"] > 0 and summary["n_low_ivar"] > 0
    i, _ = _nearest(det, np.asarray(truth["x"]), np.asarray(truth["y"]))
    star = np.asarray(truth["kind"] == "star")
    is_star = (flags[i] & CUT_STAR) != 0
    assert is_star[star].mean() >= 0.9, summary["star_params"]
    assert not is_star[~star].any()
    assert summary["star_params"]["method"] == "auto"
    # edge source near x = 6 is flagged EDGE
    j, d = _nearest(det, np.array([6.0]), np.array([350.0]))
    assert d[0] < 0.5 and flags[j[0]] & CUT_EDGE
    # sources near the bad strip and in the shallow corner
    tx, ty = np.asarray(truth["x"]), np.asarray(truth["y"])
    near_bad = np.abs(tx - 601) < 15
    assert np.all(flags[i][near_bad] & CUT_BAD_PIXELS)
    corner = (tx > 40) & (tx < 130) & (ty > 40) & (ty < 130)
    assert corner.any() and np.all(flags[i][corner] & CUT_LOW_IVAR)
    clean = ~near_bad & ~corner & ~star
    assert np.all(flags[i][clean] == 0)
    png = plot_star_galaxy(det, (flags & CUT_STAR) != 0, tmp_path / "sg.png", summary["star_params"])
    assert png.stat().st_size > 5000


def test_classify_overrides_and_fallback():
    mag = np.array([20.0, 21.0, 22.0, 23.0])
    r = np.array([0.9, 0.9, 3.0, 3.0])
    mu = mag + np.array([-4.2, -4.2, -2.0, -2.0])
    s, p = classify_stars(mag, mu, r, d_star=-4.2, d_tol=0.3, r_star_max=1.5)
    assert p["method"] == "override" and s.tolist() == [True, True, False, False]
    s, p = classify_stars(mag, mu, r)  # too few for a locus fit -> PSF defaults
    assert p["method"] == "psf_default" and s.tolist() == [True, True, False, False]


def test_stamps_geometry_and_edges():
    ny, nx = 120, 200
    yy, xx = np.mgrid[:ny, :nx]
    img = (xx + 1000.0 * yy).astype(">f8")
    st, off, fl = extract_stamps(img, [100.3, 3.0, 150.0], [50.7, 60.0, 119.0])
    assert st.shape == (3, 32, 32) and st.dtype == np.float32
    assert st[0, 0, 0] == 85 + 1000 * 35  # x0 = floor(100.3 - 15), y0 = floor(50.7 - 15)
    np.testing.assert_allclose(off[0], [-0.2, 0.2], atol=1e-12)
    assert fl.tolist() == [0, STAMP_EDGE, STAMP_EDGE]
    assert np.isnan(st[1]).all() and np.isnan(off[1]).all()
    # a symmetric source centred between pixels is centred in the stamp
    g = _gauss((ny, nx), 100.5, 50.5, 2.0, 10.0)
    st, off, fl = extract_stamps(g, [100.5], [50.5])
    np.testing.assert_allclose(off, 0.0)
    np.testing.assert_allclose(st[0], st[0][::-1, ::-1], rtol=1e-5)
    # all-zero stamp (masked area) is flagged
    st, off, fl = extract_stamps(np.zeros((64, 64)), [31.5], [31.5])
    assert fl[0] == STAMP_EMPTY


def test_pipeline_from_fits_files(tmp_path):
    """load_field -> detect_sources -> apply_cuts -> extract_stamps on big-endian FITS files."""
    from astropy.io import fits

    from wlshear.clash.io import SCI_PATTERN, WHT_PATTERN, load_field

    rng = np.random.default_rng(1)
    shape = (300, 300)
    truth = np.array([[80.3, 90.8], [200.6, 150.1], [150.2, 240.7]])
    hdr = _wcs(shape).to_header()
    for filt in ("f606w", "f814w"):
        img = rng.normal(0, NOISE * np.sqrt(2), shape)
        for x, y in truth:
            img += _gauss(shape, x, y, 3.0, _mag2flux(22.5))
        fits.PrimaryHDU(img.astype(">f4"), header=hdr).writeto(tmp_path / SCI_PATTERN.format(cluster="m0416", filter=filt))
        wht = np.full(shape, 0.5 / NOISE**2, dtype=">f4")
        fits.PrimaryHDU(wht, header=hdr).writeto(tmp_path / WHT_PATTERN.format(cluster="m0416", filter=filt))
    fld = load_field(tmp_path, "m0416", filters=["f606w", "f814w"])
    np.testing.assert_allclose(fld.ivar, 1 / NOISE**2, rtol=1e-5)
    det = detect_sources(fld.image, fld.ivar, fld.bad, fld.wcs)
    i, d = _nearest(det, truth[:, 0], truth[:, 1])
    assert np.all(d < 0.2)
    np.testing.assert_allclose(det["mag"][i], 22.5, atol=0.1)
    flags, summary = apply_cuts(det, fld.shape, fld.bad, fld.ivar)
    assert np.all(flags[i] == 0) and summary["n_total"] == len(det)
    st, off, sfl = extract_stamps(fld.image, det["x"][i], det["y"][i])
    assert np.all(sfl == 0) and np.all(np.abs(off) <= 0.5)
    # the brightest stamp pixel sits next to the stamp centre (15.5, 15.5)
    for s in st:
        py, px = np.unravel_index(np.argmax(s), s.shape)
        assert px in (15, 16) and py in (15, 16)
