"""The training shear prior: the paper's uniform one unchanged, the Gaussian option's variance,
truncation and validation, and its reaching the head refit's attenuation correction."""

from __future__ import annotations

import numpy as np
import pytest

from wlshear.sim.augment import Augmentation, sample_params, shear_variance


def test_uniform_prior_draws_exactly_what_it_drew_before():
    aug = Augmentation()
    assert aug.shear_prior == "uniform" and aug.shear_max == 0.2
    g1, g2 = aug.sample_shear(np.random.default_rng(3), 1000)
    ref = np.random.default_rng(3)
    np.testing.assert_array_equal(g1, ref.uniform(-0.2, 0.2, 1000))
    np.testing.assert_array_equal(g2, ref.uniform(-0.2, 0.2, 1000))
    assert aug.shear_var == pytest.approx(0.2**2 / 3)


def test_sample_params_keeps_its_random_stream_for_the_uniform_prior():
    w = np.full(10, 0.1)
    p = sample_params(np.random.default_rng(5), 200, w, Augmentation())
    ref = np.random.default_rng(5)
    ref.choice(10, size=200, p=w)
    np.testing.assert_array_equal(p.g1, ref.uniform(-0.2, 0.2, 200))
    np.testing.assert_array_equal(p.g2, ref.uniform(-0.2, 0.2, 200))


def test_gaussian_prior_variance_and_truncation():
    aug = Augmentation(shear_prior="gaussian", shear_sigma=0.12, shear_max=0.25)
    g1, g2 = aug.sample_shear(np.random.default_rng(0), 400_000)
    g = np.concatenate([g1, g2])
    assert np.abs(g).max() < 0.25
    # the truncated-Gaussian variance formula, against the draws and against a numerical integral
    x = np.linspace(-0.25, 0.25, 200_001)
    pdf = np.exp(-0.5 * (x / 0.12) ** 2)
    num = np.trapezoid(x**2 * pdf, x) / np.trapezoid(pdf, x)
    assert aug.shear_var == pytest.approx(num, rel=1e-6)
    assert g.var() == pytest.approx(aug.shear_var, rel=0.01)
    assert aug.shear_var < 0.12**2  # truncation at ~2 sigma removes variance
    # far from the truncation it is the Gaussian's own variance
    assert shear_variance("gaussian", 0.9, 0.12) == pytest.approx(0.12**2, rel=1e-9)
    # independent components, symmetric about zero
    assert abs(np.corrcoef(g1, g2)[0, 1]) < 0.01 and abs(g.mean()) < 1e-3


@pytest.mark.parametrize("kw, match", [
    ({"shear_prior": "laplace"}, "shear_prior must be one of"),
    ({"shear_prior": "gaussian", "shear_sigma": 0.0}, "shear_sigma must be > 0"),
])
def test_bad_shear_prior_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Augmentation(**kw)
    with pytest.raises(ValueError, match="shear_prior must be one of"):
        shear_variance("laplace", 0.2)


def test_gaussian_prior_changes_the_cache_key_and_the_uniform_key_is_stable():
    from wlshear.data.datasets import renderer_description
    from wlshear.sim.render import StampRenderer
    from wlshear.sim.sources import ParametricSource

    src = ParametricSource(n_galaxies=20, seed=1)
    uni = renderer_description(StampRenderer(src, noise=None, augment=Augmentation()))
    gau = renderer_description(StampRenderer(src, noise=None, augment=Augmentation(shear_prior="gaussian")))
    assert "shear_prior" not in uni["augment"]  # sets cached before the option existed keep their key
    assert gau["augment"]["shear_prior"] == "gaussian" and gau["augment"]["shear_sigma"] == 0.12
