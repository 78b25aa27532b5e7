"""COSMOS sources (real and parametric), catalogue errors, and population weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from wlshear.sim.augment import Augmentation
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.population import homogenised_weights, matched_weights, population_weights
from wlshear.sim.render import StampRenderer
from wlshear.sim.sources import CosmosSource, ParametricSource

from conftest import FAST_GSPARAMS


def test_missing_catalogue_directory_gives_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="galsim_download_cosmos"):
        CosmosSource(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="real_galaxy_catalog_"):
        CosmosSource(tmp_path)


def test_incomplete_catalogue_names_missing_files(tmp_path, cosmos_real_dir):
    name = "real_galaxy_catalog_26_extension_example.fits"
    shutil.copy(cosmos_real_dir / name, tmp_path / name)
    with pytest.raises(FileNotFoundError) as err:
        CosmosSource(tmp_path, use_real=True)
    msg = str(err.value)
    for missing in ("real_galaxy_images_extension.fits", "real_galaxy_PSF_images_extension.fits",
                    "real_galaxy_catalog_26_extension_example_fits.fits", "galsim_download_cosmos"):
        assert missing in msg


def test_real_galaxy_reconvolution_path(cosmos_real_dir):
    src = CosmosSource(cosmos_real_dir, gsparams=FAST_GSPARAMS)
    assert len(src) == 100
    # magnitudes move to the CLASH zero-point by the release's net shift of about 2.03 mag
    shift = np.median(src.catalog["mag"] - src.catalog["mag_source"])
    assert shift == pytest.approx(2.03, abs=0.02)
    # radii: COSMOS pixels (0.03") -> target pixels (0.065") with alpha: a factor 1/4
    r = StampRenderer(src, noise=None, augment=Augmentation().test_mode(), gsparams=FAST_GSPARAMS)
    b = r.simulate(24, 0)
    assert len(b) == 24 and not b.failures
    s = b.stamps
    assert np.all(np.isfinite(s))
    nz = s[s != 0]
    assert nz.min() >= 0.012 * 0.3203 * (1 - 1e-6)  # masked below 0.012 before the flux factor
    assert (s == 0).mean() > 0.3
    # bright galaxies are bright: total counts follow the catalogue magnitude
    flux = s.sum(axis=(1, 2))
    assert np.corrcoef(flux, -b.meta["mag"])[0, 1] > 0.5


def test_real_galaxies_pickle_for_workers(cosmos_real_dir):
    import pickle

    src = CosmosSource(cosmos_real_dir, gsparams=FAST_GSPARAMS)
    src.galaxy(0)
    clone = pickle.loads(pickle.dumps(src))
    a = src.galaxy(3).drawImage(nx=32, ny=32, scale=0.065).array
    b = clone.galaxy(3).drawImage(nx=32, ny=32, scale=0.065).array
    np.testing.assert_allclose(a, b)


def test_cosmos_parametric_path(cosmos_param_dir):
    src = CosmosSource(cosmos_param_dir, use_real=False, gsparams=FAST_GSPARAMS)
    assert len(src) >= 90 and src.name == "cosmos_parametric"
    r = StampRenderer(src, noise=CorrelatedNoise(), gsparams=FAST_GSPARAMS)
    b = r.simulate(16, 1)
    assert len(b) == 16 and np.all(np.isfinite(b.stamps))
    assert np.all(b.meta["snr"] > 0)


def test_cosmos_parametric_needs_fits_file(tmp_path, cosmos_real_dir):
    # the 26-extension sample has no Sersic fits: parametric use must fail clearly
    with pytest.raises((ValueError, KeyError, OSError)):
        CosmosSource(cosmos_real_dir, use_real=False)


def test_homogenised_weights_equalise_bins():
    rng = np.random.default_rng(0)
    mag = np.concatenate([rng.uniform(16, 19.5, 50), rng.uniform(19.5, 21.5, 500), rng.uniform(21.5, 23.5, 5000)])
    w = homogenised_weights(mag, [[16, 19.5], [19.5, 21.5], [21.5, 23.5]])
    assert w.sum() == pytest.approx(1)
    for lo, hi in [(16, 19.5), (19.5, 21.5), (21.5, 23.5)]:
        sel = (mag > lo) & (mag <= hi)
        assert w[sel].sum() == pytest.approx(1 / 3, abs=1e-3)
    with pytest.raises(ValueError, match="no galaxy"):
        homogenised_weights(mag, [[30, 31]])


def test_matched_weights_reproduce_target_distribution(tmp_path):
    rng = np.random.default_rng(1)
    n = 40000
    mag = rng.uniform(20, 27, n)
    r = 10 ** rng.uniform(0, 1.2, n)
    tmag = rng.normal(25, 0.6, 20000)
    tr = 10 ** rng.normal(0.4, 0.1, 20000)
    w = matched_weights(mag, r, tmag, tr)
    draw = rng.choice(n, 20000, p=w)
    assert np.mean(mag[draw]) == pytest.approx(25, abs=0.1)
    assert np.mean(np.log10(r[draw])) == pytest.approx(0.4, abs=0.03)
    # through a CSV target catalogue and the renderer-facing helper
    from astropy.table import Table

    src = ParametricSource(n_galaxies=5000, seed=0)
    Table({"MAG": tmag, "HLR_PX": tr}).write(tmp_path / "target.csv")
    w2 = population_weights(src, "matched", target_catalog=tmp_path / "target.csv")
    assert np.average(src.catalog["mag"], weights=w2) == pytest.approx(25, abs=0.2)
    Table({"m": tmag}).write(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="lacks column"):
        population_weights(src, "matched", target_catalog=tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unknown population"):
        population_weights(src, "weird")
