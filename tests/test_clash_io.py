"""CLASH file layout, filter combination and catalogue reading (synthetic FITS in tmp_path)."""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from wlshear.clash.io import (
    DEFAULT_FILTERS,
    SCI_PATTERN,
    WHT_PATTERN,
    combine_filters,
    find_filter_files,
    load_field,
    read_catalogue,
    read_image,
)

CLUSTER = "a383"


def _wcs_header(shape):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [42.014, -3.529]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cdelt = [-0.065 / 3600, 0.065 / 3600]
    return w.to_header()


def _write_filter(d, filt, sci, wht, header=True):
    hdr = _wcs_header(sci.shape) if header else fits.Header()
    # big-endian float32 on disk, as in the real mosaics
    fits.PrimaryHDU(sci.astype(">f4"), header=hdr).writeto(d / SCI_PATTERN.format(cluster=CLUSTER, filter=filt))
    fits.PrimaryHDU(wht.astype(">f4"), header=hdr).writeto(d / WHT_PATTERN.format(cluster=CLUSTER, filter=filt))


def test_combine_filters_arithmetic():
    s = [np.full((4, 5), v) for v in (1.0, 2.0, 6.0)]
    w = [np.full((4, 5), v) for v in (1e3, 2e3, 4e3)]
    w[1][0, 0] = 50.0  # below min_weight in one filter
    s[2][1, 1] = np.nan  # non-finite science pixel
    w[0][2, 2] = np.inf
    img, ivar, bad = combine_filters(s, w, min_weight=100)
    assert img.dtype == np.float64 and img.flags.c_contiguous
    np.testing.assert_allclose(img[3, 3], 3.0)
    np.testing.assert_allclose(ivar[3, 3], 9.0 / (1 / 1e3 + 1 / 2e3 + 1 / 4e3))
    assert bad[0, 0] and bad[1, 1] and bad[2, 2] and bad.sum() == 3
    assert img[bad].tolist() == [0.0] * 3 and ivar[bad].tolist() == [0.0] * 3
    with pytest.raises(ValueError, match="same pixel grid"):
        combine_filters([np.zeros((3, 3)), np.zeros((3, 4))], [np.ones((3, 3)), np.ones((3, 4))])


def test_load_field_all_and_missing_filters(tmp_path):
    rng = np.random.default_rng(0)
    shape = (40, 50)
    filters = ["f606w", "f775w", "f814w"]
    scis = {f: rng.normal(1.0, 0.1, shape) for f in filters}
    for f in filters:
        _write_filter(tmp_path, f, scis[f], np.full(shape, 1e5))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        field = load_field(tmp_path, CLUSTER)  # default list: 4 of 7 filters absent
    assert any("f435w" in str(r.message) for r in rec)
    assert field.filters == filters
    assert sorted(field.missing_filters) == sorted(set(DEFAULT_FILTERS) - set(filters))
    expect = np.mean([scis[f].astype(np.float32).astype(np.float64) for f in filters], axis=0)
    np.testing.assert_allclose(field.image, expect, rtol=1e-6)
    np.testing.assert_allclose(field.ivar, 9 / (3 / 1e5))
    assert field.image.dtype.isnative and not field.bad.any()
    ra, dec = field.wcs.pixel_to_world_values(shape[1] / 2 - 1, shape[0] / 2 - 1)
    assert abs(ra - 42.014) < 1e-6 and abs(dec + 3.529) < 1e-6
    # explicit filter list without warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_field(tmp_path, CLUSTER, filters=filters[:2]).filters == filters[:2]


def test_missing_files_error_lists_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="f435w_v1_drz.fits"):
        find_filter_files(tmp_path, CLUSTER)
    # science present but weight absent -> filter incomplete
    fits.PrimaryHDU(np.zeros((5, 5), ">f4")).writeto(tmp_path / SCI_PATTERN.format(cluster=CLUSTER, filter="f814w"))
    with pytest.raises(FileNotFoundError, match="f814w_v1_wht.fits"):
        find_filter_files(tmp_path, CLUSTER, filters=["f814w"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_filter_files(tmp_path / "nope", CLUSTER)


def test_corrupt_fits_names_file(tmp_path):
    shape = (20, 20)
    _write_filter(tmp_path, "f814w", np.ones(shape), np.full(shape, 1e5))
    bad = tmp_path / SCI_PATTERN.format(cluster=CLUSTER, filter="f606w")
    bad.write_bytes(b"this is not a FITS file at all" * 10)
    fits.PrimaryHDU(np.ones(shape, ">f4")).writeto(tmp_path / WHT_PATTERN.format(cluster=CLUSTER, filter="f606w"))
    with pytest.raises(ValueError, match="f606w_v1_drz.fits"):
        load_field(tmp_path, CLUSTER, filters=["f814w", "f606w"])
    with pytest.raises(ValueError, match="could not read FITS"):
        read_image(bad)


def test_missing_wcs_and_shape_mismatch(tmp_path):
    _write_filter(tmp_path, "f814w", np.ones((20, 20)), np.full((20, 20), 1e5), header=False)
    with pytest.raises(ValueError, match="no celestial WCS"):
        load_field(tmp_path, CLUSTER, filters=["f814w"])
    d2 = tmp_path / "b"
    d2.mkdir()
    _write_filter(d2, "f814w", np.ones((20, 20)), np.full((20, 20), 1e5))
    _write_filter(d2, "f606w", np.ones((20, 21)), np.full((20, 21), 1e5))
    with pytest.raises(ValueError, match="shape"):
        load_field(d2, CLUSTER, filters=["f814w", "f606w"])


def test_read_catalogue_formats(tmp_path):
    t = Table({"ALPHA_J2000": [10.0, 10.1], "DELTA_J2000": [-5.0, -5.1], "G1": [0.1, -0.2], "G2": [0.0, 0.3]})
    t.write(tmp_path / "wl.fits")
    c = read_catalogue(tmp_path / "wl.fits")
    np.testing.assert_allclose(c["ra"], [10.0, 10.1])
    np.testing.assert_allclose(c["dec"], [-5.0, -5.1])
    np.testing.assert_allclose(c["g1"], [0.1, -0.2])
    np.testing.assert_allclose(c["g2"], [0.0, 0.3])

    (tmp_path / "wl.csv").write_text("id,RA,Dec,g1,g2\n1,150.1,2.2,0.01,0.02\n2,150.2,2.3,-0.01,0.0\n")
    c = read_catalogue(tmp_path / "wl.csv")
    np.testing.assert_allclose(c["dec"], [2.2, 2.3])
    np.testing.assert_allclose(c["g1"], [0.01, -0.01])

    # CLASH-like photometric catalogue: several comment lines, names on the last one
    (tmp_path / "hlsp_clash_hst_acs-ir_a383_cat.txt").write_text(
        "# CLASH photometric catalogue\n# generated by a pipeline\n"
        "# id RA Dec f814w_mag f814w_magerr\n"
        "1 42.01 -3.52 24.1 0.05\n2 42.02 -3.53 25.3 0.12\n3 42.03 -3.54 23.0 0.02\n"
    )
    c = read_catalogue(tmp_path / "hlsp_clash_hst_acs-ir_a383_cat.txt")
    assert len(c) == 3
    np.testing.assert_allclose(c["ra"], [42.01, 42.02, 42.03])
    np.testing.assert_allclose(c["f814w_mag"], [24.1, 25.3, 23.0])


def test_catalogue_without_radec(tmp_path):
    (tmp_path / "x.txt").write_text("# id x y g1 g2\n1 3.0 4.0 0.1 0.2\n2 5.0 6.0 0.0 0.1\n")
    with pytest.raises(ValueError, match=r"no RA/Dec columns.*'x'"):
        read_catalogue(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError):
        read_catalogue(tmp_path / "absent.txt")
