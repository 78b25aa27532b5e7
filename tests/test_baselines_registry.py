"""The baseline configs (conf/baselines, built by _target_) and the common interface: every baseline
gives finite estimates on simple galaxies and flags a flat (all-zero) and a NaN stamp as failed."""

import importlib.util
from pathlib import Path

import galsim
import numpy as np
import pytest

from hydra.errors import HydraException
from hydra.utils import get_class

from wlshear.utils.hydra import CONF_DIR, compose_config

RELEASE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wlenet_release")
PSF = galsim.Gaussian(fwhm=0.121)


def _kwargs(name):
    if name == "wlenet":
        if not (RELEASE / "cnn_image_clash_uniform_mse_lsq.hdf5").is_file():
            pytest.skip(f"wlenet release files not found in {RELEASE.resolve()}")
        return {"path_or_dir": RELEASE}
    if name == "fpfs" and importlib.util.find_spec("anacal") is None:
        pytest.skip("FPFS baseline needs the anacal package (pip install anacal==0.8.3)")
    return {}


def _galaxies():
    rng = np.random.default_rng(0)
    out = []
    for e1, e2, hlr in [(0.2, 0.0, 0.12), (-0.1, 0.25, 0.2), (0.0, -0.3, 0.3), (0.0, 0.0, 0.1)]:
        gal = galsim.Exponential(half_light_radius=hlr, flux=10.0).shear(g1=e1, g2=e2)
        img = galsim.Convolve(gal, PSF).drawImage(nx=32, ny=32, scale=0.065).array
        out.append(img + rng.normal(0, 3.6e-3, (32, 32)))
    return np.stack(out).astype(np.float32)


BASELINES = sorted(p.stem for p in (CONF_DIR / "baselines").glob("*.yaml"))


def test_evaluate_uses_every_baseline_config():
    """The paper's protocol (evaluate=paper) runs every baseline config; the default the fast ones."""
    assert BASELINES == ["fpfs", "ksb", "moments", "regauss", "rrg", "wlenet"]
    assert sorted(compose_config("evaluate", ["evaluate=paper"]).baselines) == BASELINES
    assert sorted(compose_config("evaluate").baselines) == ["fpfs", "moments"]


@pytest.mark.parametrize("name", BASELINES)
def test_common_interface(name):
    spec = dict(compose_config("evaluate", [f"baselines=[{name}]"]).baselines[name])
    kw = {k: v for k, v in spec.items() if k != "_target_" and v is not None}
    est = get_class(spec["_target_"])(**{**kw, **_kwargs(name)})
    assert est.name == name
    gals = _galaxies()
    stamps = np.concatenate([gals, np.zeros((1, 32, 32), np.float32),
                             np.full((1, 32, 32), np.nan, np.float32)])
    g, failed = est.estimate(stamps)
    assert g.shape == (6, 2) and g.dtype == np.float64
    assert failed.shape == (6,) and failed.dtype == bool
    assert failed.tolist() == [False] * 4 + [True, True]
    assert np.all(np.isfinite(g[:4])) and np.all(np.isnan(g[4:]))
    # elongation signs of the first three galaxies are recovered
    assert g[0, 0] > 0 and g[1, 1] > 0 and g[2, 1] < 0


def test_unknown_baseline():
    with pytest.raises(HydraException, match="nope"):
        compose_config("evaluate", ["baselines=[nope]"])
