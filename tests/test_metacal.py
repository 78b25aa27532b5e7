"""Metacalibration: the counterfactual operator against GalSim, known-shear round trips, fixnoise,
the estimator API and the training switch."""

from __future__ import annotations

import math
from pathlib import Path

import galsim
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import wlshear
from wlshear.calibration.metacal import (
    ensemble_response,
    ensemble_shear,
    metacal_measure,
    selection_response,
)
from wlshear.metrics.shear_pairs import pair_bias
from wlshear.models.estimator import ShearEstimator
from wlshear.sim.augment import Augmentation
from wlshear.sim.metacal import MetacalOperator, MetacalSettings, counterfactual_matrix, shear_matrix
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.render import StampRenderer
from wlshear.sim.sources import ParametricSource

from conftest import FAST_GSPARAMS

CONF = str(Path(__file__).resolve().parents[1] / "conf")
N = 32
_c = np.arange(N) - 15.5
YY, XX = np.meshgrid(_c, _c, indexing="ij")
WEIGHT = np.exp(-(XX**2 + YY**2) / (2 * 3.0**2))


def weighted_moments(stamps):
    """Gaussian-weighted (sigma 3 px) second-moment ellipticity about the stamp centre."""
    w = np.asarray(stamps, float) * WEIGHT
    qxx, qyy, qxy = (w * XX * XX).sum((1, 2)), (w * YY * YY).sum((1, 2)), (w * XX * YY).sum((1, 2))
    t = qxx + qyy
    return np.stack([(qxx - qyy) / t, 2 * qxy / t], 1), np.zeros(len(w), bool)


def gradient_shape(stamps):
    """Ellipticity of the weighted gradient structure tensor: sensitive to noise anisotropy."""
    s = np.asarray(stamps, float)
    wc = np.exp(-(XX**2 + YY**2) / (2 * 6.0**2))[1:-1, 1:-1]
    gx = (s[:, 1:-1, 2:] - s[:, 1:-1, :-2]) / 2
    gy = (s[:, 2:, 1:-1] - s[:, :-2, 1:-1]) / 2
    txx, tyy, txy = (wc * gx * gx).sum((1, 2)), (wc * gy * gy).sum((1, 2)), (wc * gx * gy).sum((1, 2))
    return np.stack([(txx - tyy) / (txx + tyy), 2 * txy / (txx + tyy)], 1), np.zeros(len(s), bool)


class MomentsNet(nn.Module):
    """A differentiable-free 'network' that returns weighted-moment ellipticities (for API tests)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(WEIGHT, dtype=torch.float32), requires_grad=False)
        self.x = torch.as_tensor(XX, dtype=torch.float32)
        self.y = torch.as_tensor(YY, dtype=torch.float32)

    def forward(self, x):
        w = x[:, 0] * self.w
        qxx, qyy, qxy = (w * self.x**2).sum((1, 2)), (w * self.y**2).sum((1, 2)), (w * self.x * self.y).sum((1, 2))
        t = qxx + qyy
        return torch.stack([(qxx - qyy) / t, 2 * qxy / t], 1)


def _galaxy_stamp():
    gal = galsim.Exponential(half_light_radius=0.15, flux=5.0).shear(g1=0.2, g2=-0.1).shift(0.02, -0.01)
    psf = galsim.Gaussian(fwhm=0.121)
    return gal, psf, galsim.Convolve(gal, psf).drawImage(nx=N, ny=N, scale=0.065).array


@pytest.mark.parametrize("interpolant,tol", [("quintic", 1e-3), ("sinc", 1e-2)])
def test_operator_matches_galsim_reference(interpolant, tol):
    """Stamp by stamp against GalSim's InterpolatedImage -> Deconvolve -> shear -> Convolve."""
    gal, psf, stamp = _galaxy_stamp()
    op = MetacalOperator(MetacalSettings(fixnoise=False, interpolant=interpolant))
    names = ("noshear", "1p", "2m")
    ours = op.counterfactuals(torch.tensor(stamp[None], dtype=torch.float64), names)[0].numpy()
    psf_eff = galsim.Convolve(psf, galsim.Pixel(0.065))
    ii = galsim.InterpolatedImage(galsim.Image(stamp, scale=0.065), x_interpolant="quintic")
    for k, (g1, g2) in enumerate(op.shears(names)):
        obj = galsim.Convolve(ii, galsim.Deconvolve(psf_eff))
        if g1 or g2:
            obj = obj.shear(g1=g1, g2=g2)
        ref = galsim.Convolve(obj, galsim.Gaussian(fwhm=0.121 * op.settings.reconv_factor)).drawImage(nx=N, ny=N, scale=0.065).array
        assert np.abs(ours[k] - ref).max() < tol * ref.max(), (names[k], np.abs(ours[k] - ref).max() / ref.max())
        # flux is conserved
        assert abs(ours[k].sum() - ref.sum()) < 1e-3 * ref.sum()


def test_band_limited_counterfactual_matches_truth():
    """The default (band-limited) operator reproduces the galaxy sheared and seen through P' to 5e-4."""
    gal, psf, stamp = _galaxy_stamp()
    op = MetacalOperator(MetacalSettings(fixnoise=False))
    out = op.counterfactuals(torch.tensor(stamp[None], dtype=torch.float64))[0].numpy()
    reconv = galsim.Gaussian(fwhm=0.121 * op.settings.reconv_factor)
    for k, (g1, g2) in enumerate(op.shears(["noshear", "1p", "1m", "2p", "2m"])):
        g = gal.shear(g1=g1, g2=g2) if (g1 or g2) else gal
        truth = galsim.Convolve(g, reconv).drawImage(nx=N, ny=N, scale=0.065).array
        assert np.abs(out[k] - truth).max() < 5e-4 * truth.max()


def test_matrix_properties():
    s = MetacalSettings(fixnoise=False)
    m0 = counterfactual_matrix(0, 0, s, margin=0)
    # isotropic at d = 0: commutes with a quarter turn; sheared matrices do not
    x = np.random.default_rng(0).normal(size=(N, N))
    y = (m0 @ x.ravel()).reshape(N, N)
    y_rot = (m0 @ np.rot90(x).ravel()).reshape(N, N)
    assert np.allclose(np.rot90(y), y_rot, atol=1e-6 * np.abs(y).max())
    a = shear_matrix(0.3, 0.0)
    assert math.isclose(np.linalg.det(a), 1.0) and a[0, 0] > a[1, 1]
    with pytest.raises(ValueError, match="must be < 1"):
        shear_matrix(0.8, 0.7)


@pytest.fixture(scope="module")
def noiseless_pairs():
    src = ParametricSource(gsparams=FAST_GSPARAMS)
    r = StampRenderer(src, None, Augmentation().test_mode(), backend="torch", gsparams=FAST_GSPARAMS)
    batch, design = r.render_shear_pairs(np.arange(60), 1, 0.02, seed=3)
    return batch, design


def test_noiseless_known_shear_round_trip(noiseless_pairs):
    """A known input shear comes back through metacal with |m| < 1e-3 (the raw estimator is off by ~20%)."""
    batch, design = noiseless_pairs
    op = MetacalOperator(MetacalSettings(fixnoise=False))
    res = metacal_measure(weighted_moments, op, batch.stamps)
    b = pair_bias(res["g"], design, 0.02, R=res["R"], n_boot=50, rng=0)
    assert abs(b["m1"]) < 1e-3 and abs(b["m2"]) < 1e-3, b
    assert abs(b["c1"]) < 1e-4 and abs(b["c2"]) < 1e-4, b
    raw = pair_bias(weighted_moments(batch.stamps)[0], design, 0.02, n_boot=10, rng=0)
    assert raw["m1"] < -0.05  # without the response the moments are far from calibrated


def test_estimator_metacal_api_round_trip(noiseless_pairs, tmp_path):
    """est.metacal from a saved file: shapes, symmetrised responses and the known shear back."""
    batch, design = noiseless_pairs
    est = ShearEstimator(MomentsNet(), normalize=False, metacal=MetacalSettings(fixnoise=False))
    out = est.metacal(batch.stamps, symmetrize=True)
    assert out["g"].shape == (len(batch), 2) and out["R"].shape == (len(batch), 2, 2)
    assert not out["failed"].any()
    b = pair_bias(out["g"], design, 0.02, R=out["R"], n_boot=50, rng=0)
    assert abs(b["m1"]) < 1e-3 and abs(b["m2"]) < 1e-3, b
    assert abs(b["c1"]) < 1e-4 and abs(b["c2"]) < 1e-4, b
    r = ensemble_response(out["R"])
    assert 0.3 < r[0, 0] < 1.5 and abs(r[0, 1]) < 0.05 * r[0, 0]
    sheared = est.metacal(batch.stamps[:8], return_sheared=True)["g_sheared"]
    assert sheared.shape == (8, 4, 2)


def test_estimator_file_carries_metacal_settings(tmp_path):
    from wlshear.models.architectures import PaperCNN

    settings = MetacalSettings(reconv_factor=1.4, step=0.02, noise_scale=0.5)
    est = ShearEstimator(PaperCNN(), metacal=settings, counterfactual_input=True)
    path = est.save(tmp_path / "est.pt")
    loaded = wlshear.load_estimator(path)
    assert loaded.metacal_operator.settings == settings and loaded.counterfactual_input
    x = CorrelatedNoise(None, 0.5).sample(np.random.default_rng(1), 6)
    out = loaded.metacal(x)
    assert np.isfinite(out["g"]).all() and np.isfinite(out["R"]).all()
    # the same seed gives the same fixnoise, hence the same result
    assert np.array_equal(out["R"], loaded.metacal(x)["R"])
    # predict of a counterfactual-trained net maps raw stamps to the no-shear image itself
    assert np.isfinite(loaded.predict(x)).all()


def test_fixnoise_removes_noise_induced_c_and_response():
    """Pure noise with a strongly anisotropic kernel: without fixnoise the shape statistic has a large
    additive term c and a spurious response; the 'isotropic' fixnoise scheme removes both."""
    k = np.zeros((7, 7))
    k[3, 1:6] = [0.3, 0.6, 1.0, 0.6, 0.3]
    k[2, 3] = k[4, 3] = 0.2
    noise = CorrelatedNoise(k, 1.0).sample(np.random.default_rng(0), 3000)
    res = {}
    for scheme in ("none", "ngmix", "isotropic"):
        op = MetacalOperator(MetacalSettings(fixnoise=scheme != "none", noise_kernel=k.tolist(), noise_scale=1.0,
                                             fixnoise_scheme="ngmix" if scheme == "none" else scheme))
        m = metacal_measure(gradient_shape, op, noise, seed=1)
        e, R = m["g"], m["R"]
        res[scheme] = (e.mean(0), e.std(0) / np.sqrt(len(e)), R.mean(0), R.std(0) / np.sqrt(len(e)))
    c, c_err, R, R_err = res["none"]
    assert abs(c[0]) > 50 * c_err[0]        # the kernel's anisotropy: c1 ~ -0.29
    assert abs(R[0, 0]) > 20 * R_err[0, 0]  # sheared noise fakes a response
    c, c_err, R, R_err = res["ngmix"]
    assert abs(R[0, 0]) < 4 * R_err[0, 0] + 0.02  # ngmix's rotation cancels the fake response ...
    assert abs(c[0]) > 50 * c_err[0]              # ... but not the anisotropy
    c, c_err, R, R_err = res["isotropic"]
    assert np.all(np.abs(c) < 4 * c_err + 1e-3), (c, c_err)
    assert abs(R[0, 0]) < 4 * R_err[0, 0] + 0.02 and abs(R[1, 1]) < 4 * R_err[1, 1] + 0.02


def test_bad_input_gives_clear_errors():
    from wlshear.models.architectures import PaperCNN

    est = ShearEstimator(PaperCNN(), metacal=MetacalSettings(noise_scale=1.0))
    x = CorrelatedNoise(None, 1.0).sample(np.random.default_rng(2), 4)
    x[1, 3, 3] = np.nan
    x[2] = 0.0            # blank
    x[3] *= 1e-12         # not CLASH counts
    out = est.metacal(x)
    assert out["failed"].tolist() == [False, True, True, True]
    assert [r.split(":")[0] for r in out["reasons"]] == ["", "non-finite", "all zero", "scale too small"]
    assert np.isnan(out["g"][1:]).all() and np.isnan(out["R"][1:]).all() and np.isfinite(out["g"][0]).all()
    with pytest.raises(ValueError, match=r"side 32 \+ 2 x margin .* got side 16"):
        est.metacal(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"got side 35"):
        est.metacal(np.zeros((3, 35, 35), np.float32))
    with pytest.raises(ValueError, match=r"square stamps"):
        est.metacal(np.zeros((3, 48, 40), np.float32))
    with pytest.raises(ValueError, match="one stamp"):
        est.metacal(np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match="carries no metacal settings"):
        ShearEstimator(PaperCNN()).metacal(x[:1])
    with pytest.raises(ValueError, match="metacal.reconv_factor"):
        MetacalSettings(reconv_factor=0.9)
    with pytest.raises(ValueError, match="metacal.fixnoise_scheme"):
        MetacalSettings(fixnoise_scheme="rotate")
    with pytest.raises(ValueError, match="non-finite"):
        MetacalOperator().counterfactuals(torch.as_tensor(x))
    with pytest.raises(ValueError, match="unknown metacal settings"):
        MetacalSettings.from_dict({"psf": 0.1})


def test_ensemble_and_selection_responses():
    rng = np.random.default_rng(4)
    n = 20000
    true = np.array([0.03, -0.02])
    R = np.tile(np.array([[0.6, 0.02], [0.01, 0.7]]), (n, 1, 1)) + rng.normal(0, 0.05, (n, 2, 2))
    g = np.einsum("nij,j->ni", R, true) + rng.normal(0, 0.2, (n, 2))
    res = ensemble_shear(g, R)
    assert np.all(np.abs(res["shear"] - true) < 4 * res["shear_err"])
    w = rng.uniform(0.5, 1.5, n)
    assert np.all(np.abs(ensemble_shear(g, R, weights=w)["shear"] - true) < 0.01)
    # a selection that prefers positive g1 when sheared by +d1 gives a positive R_S[0, 0]
    sel_1p, sel_1m = g[:, 0] > -0.1, g[:, 0] > -0.09
    rs = selection_response(g, [sel_1p, sel_1m, np.ones(n, bool), np.ones(n, bool)], step=0.01)
    assert rs[0, 0] < 0 and rs[1, 1] == 0
    with pytest.raises(ValueError, match="four masks"):
        selection_response(g, [sel_1p], step=0.01)


def test_pair_bias_recovers_known_m_and_c():
    src = ParametricSource(gsparams=FAST_GSPARAMS)
    from wlshear.sim.augment import shear_pair_params

    params, groups, design = shear_pair_params(np.arange(50), 4, 0.02, np.random.default_rng(0))
    g_true = np.stack([params.g1, params.g2], 1)
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.003, (len(g_true) // 2, 2))[groups]  # common noise within +-g pairs
    g = 1.05 * g_true + np.array([0.001, -0.002]) + noise
    b = pair_bias(g, design, 0.02, n_boot=100, rng=0)
    assert abs(b["m1"] - 0.05) < 1e-6 and abs(b["m2"] - 0.05) < 1e-6  # common noise cancels exactly
    assert abs(b["c1"] - 0.001) < 4 * b["c1_err"] and abs(b["c2"] + 0.002) < 4 * b["c2_err"]
    assert len(src.catalog["mag"]) > 0


def _cfg(tmp_path, overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train.yaml", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}", *overrides,
        ])


@pytest.mark.parametrize("backend", ["galsim", "torch"])
def test_train_switch_trains_on_counterfactuals(tmp_path, backend):
    """`metacal=default`: the model sees no-shear counterfactuals, and the estimator file works alone."""
    from wlshear.tasks.train import run

    cfg = _cfg(tmp_path, ["debug=fast", "metacal=default", f"data.backend={backend}", "data.samples_per_epoch=48",
                          "data.val_size=24", "data.test_size=24", "refit.n=96"])
    metrics = run(cfg)
    assert "cnn_metacal" in metrics["test"] and "R_mean" in metrics["test"]["cnn_metacal"]
    est = wlshear.load_estimator(tmp_path / "run" / "estimator_refit.pt")
    assert est.counterfactual_input and est.metacal_operator.settings.noise_scale == 1.0
    x = CorrelatedNoise(None, 1.0).sample(np.random.default_rng(0), 4)
    out = est.metacal(x)
    assert out["R"].shape == (4, 2, 2) and np.isfinite(out["R"]).all()


def test_evaluate_metacal_study(tmp_path, cosmos_real_dir):
    """evaluate.py's metacal rows on the test set and per-magnitude rows on the real galaxies."""
    import json

    from wlshear.models.architectures import PaperCNN
    from wlshear.tasks.evaluate import run

    est = ShearEstimator(PaperCNN(), metacal=MetacalSettings()).save(tmp_path / "run" / "estimator.pt")
    off = [f"studies.{s}.enabled=false" for s in ("magnitude", "conditional", "shear", "centroid", "background", "noise")]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate.yaml", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
            "extras.print_config=false", "data.source.n_galaxies=200", "data.source.p_knots=0.0", "test.n=32",
            "bootstrap=10", f"run_dir={est.parent}", "baselines=[moments,ksb]", "studies.baselines=[moments]",
            *off, f"studies.metacal.real.dir={cosmos_real_dir}", "studies.metacal.real.n_orient=1"])
    run(cfg)
    out = tmp_path / "out"
    for f in ("metacal_test.csv", "metacal_real.csv", "metacal_real.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())["studies"]["metacal"]
    assert {"cnn_metacal", "moments_metacal"} <= set(res["test_set"])
    rows = res["real_rows"]
    names = {r["estimator"] for r in rows}
    assert {"cnn_metacal", "cnn_sim", "moments", "moments_metacal", "ksb"} <= names
    bins = {r["bin"] for r in rows if r["estimator"] == "moments_metacal"}
    assert bins == {"all", "0-23", "23-24", "24-25"}
    mm = [r for r in rows if r["estimator"] == "moments_metacal" and r["bin"] == "all"][0]
    assert np.isfinite(mm["m1"]) and mm["n_units"] == res["real_stamps"] // 8
    # the operator's margin (8 px): the metacal stamps are a 48 x 48 copy of the test set; real
    # galaxies masked before lensing
    assert res["margin"] == 8 and res["real_mask_stage"] == "source"


def _unweighted_moments(stamps):
    """Unweighted second-moment ellipticity over the whole stamp: reaches the stamp edges."""
    s = np.asarray(stamps, float)
    n = s.shape[-1]
    c = np.arange(n) - (n - 1) / 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    qxx, qyy, qxy = (s * xx * xx).sum((1, 2)), (s * yy * yy).sum((1, 2)), (s * xx * yy).sum((1, 2))
    return np.stack([(qxx - qyy) / (qxx + qyy), 2 * qxy / (qxx + qyy)], 1), np.zeros(len(s), bool)


def test_margin_equals_zero_padding():
    """An input margin of zeros gives the margin-free counterfactual (same kernel, same centre)."""
    op = MetacalOperator(MetacalSettings(fixnoise=False, margin=8))
    x = CorrelatedNoise(None, 1.0).sample(np.random.default_rng(5), 3) + 0.05 * WEIGHT
    padded = np.zeros((3, 48, 48), np.float32)
    padded[:, 8:40, 8:40] = x
    a = op.counterfactuals(torch.as_tensor(padded, dtype=torch.float64)).numpy()
    b = op.counterfactuals(torch.as_tensor(x, dtype=torch.float64)).numpy()
    assert a.shape == b.shape == (3, 5, 32, 32)
    assert np.abs(a - b).max() < 1e-3 * np.abs(b).max()  # the kernel's grid period differs (4 x side)
    with pytest.raises(ValueError, match="side 32 \\+ 2 x margin"):
        op.counterfactuals(torch.zeros(2, 33, 33))


def test_margin_removes_stamp_edge_bias():
    """A galaxy larger than the stamp: with the light beyond the 32 x 32 edge (margin 8), metacal
    of an estimator that reaches the edges recovers the shear; from the 32 x 32 cut-out it cannot."""
    gal = galsim.Exponential(half_light_radius=0.45).shear(g1=0.2, g2=-0.1)  # ~7 px
    psf = galsim.Gaussian(fwhm=0.121)
    rng = np.random.default_rng(1)
    big, comp, sign, unit = [], [], [], []
    for u, rot in enumerate(rng.uniform(0, np.pi, 6)):
        for j in (0, 1):
            for s in (1, -1):
                g = (s * 0.02, 0.0) if j == 0 else (0.0, s * 0.02)
                obj = galsim.Convolve(gal.rotate(rot * galsim.radians).shear(g1=g[0], g2=g[1]), psf)
                big.append(obj.drawImage(nx=48, ny=48, scale=0.065).array)
                comp.append(j), sign.append(s), unit.append(u)
    big = np.asarray(big, np.float32)
    design = {"unit": np.asarray(unit), "component": np.asarray(comp), "sign": np.asarray(sign)}
    op = MetacalOperator(MetacalSettings(fixnoise=False, margin=8))
    out = {}
    for name, stamps in (("margin", big), ("cut-out", big[:, 8:40, 8:40])):
        res = metacal_measure(_unweighted_moments, op, stamps)
        out[name] = pair_bias(res["g"], design, 0.02, R=res["R"], n_boot=20, rng=0)
    assert abs(out["margin"]["m1"]) < 1e-3 and abs(out["margin"]["m2"]) < 1e-3, out["margin"]
    assert abs(out["cut-out"]["m1"]) > 5e-3, out["cut-out"]


def test_estimator_metacal_takes_margin_stamps():
    """est.metacal and predict take stamps with the operator's margin and return per-galaxy rows."""
    est = ShearEstimator(MomentsNet(), normalize=False, metacal=MetacalSettings(noise_scale=1.0, margin=8),
                         counterfactual_input=True)
    x = CorrelatedNoise(None, 1.0).sample(np.random.default_rng(2), 4, (48, 48))
    x[:, 8:40, 8:40] += 0.05 * WEIGHT
    out = est.metacal(x, noise_groups=np.array([0, 0, 1, 1]))
    assert out["g"].shape == (4, 2) and out["R"].shape == (4, 2, 2) and np.isfinite(out["R"]).all()
    assert np.allclose(out["g"][0], out["g"][1]) is False or np.allclose(x[0], x[1])
    assert est.predict(x).shape == (4, 2)
    assert np.isfinite(est.predict(x[:, 8:40, 8:40])).all()  # no margin: still works


def test_group_noise_shares_fields_within_groups_and_draws_in_chunks():
    """One field per distinct (sparse) group id, drawn a chunk at a time; bad groups are refused."""
    op = MetacalOperator(MetacalSettings(noise_scale=1.0, margin=8))
    groups = np.array([7, 1000003, 7, 5, 5, 1000003, 9])
    fields, index = op.group_noise(groups, len(groups), generator=torch.Generator().manual_seed(3), size=48,
                                   chunk=2)
    assert fields.shape == (4, 48, 48) and index.shape == (7,)  # 4 distinct ids, not 1000004 fields
    per_stamp = fields[torch.as_tensor(index)]
    assert torch.equal(per_stamp[0], per_stamp[2]) and torch.equal(per_stamp[3], per_stamp[4])
    assert not torch.equal(per_stamp[0], per_stamp[3]) and not torch.equal(fields[0], fields[2])
    for bad in (np.array([0, -1, 2, 3, 4, 5, 6]), np.arange(7.0), np.arange(6)):
        with pytest.raises(ValueError, match="noise_groups"):
            op.group_noise(bad, 7)


def _mask_stage_bias(cosmos_real_dir, stage):
    from wlshear.baselines import MomentsEstimator
    from wlshear.sim.sources import CosmosSource

    src = CosmosSource(cosmos_real_dir, file_name="real_galaxy_catalog_26_extension_example.fits",
                       mag_range=(24.0, 25.0), gsparams=FAST_GSPARAMS, mask_stage=stage)
    r = StampRenderer(src, None, Augmentation().test_mode(), gsparams=FAST_GSPARAMS)
    ids = np.arange(min(12, len(src)))
    batch, design = r.render_shear_pairs(ids, 3, 0.02, seed=4)
    op = MetacalOperator(MetacalSettings(fixnoise=False, noise_scale=0.0))
    res = metacal_measure(MomentsEstimator().estimate, op, batch.stamps)
    return pair_bias(res["g"], design, 0.02, R=res["R"], n_boot=50, rng=0), batch


def test_source_stage_mask_makes_real_galaxies_metacal_consistent(cosmos_real_dir):
    """Noiseless faint real COSMOS galaxies (F814W 24-25): with the paper's mask on each lensed
    stamp, even metacal of moments is biased (the stamp is not a sheared profile); masking the
    galaxy before lensing at the same level leaves the shear recoverable."""
    image, b_image = _mask_stage_bias(cosmos_real_dir, "image")
    source, b_source = _mask_stage_bias(cosmos_real_dir, "source")
    assert abs(source["m1"]) < 2e-3 and abs(source["m2"]) < 2e-3, source
    assert max(abs(image["m1"]), abs(image["m2"])) > 0.02, image  # per galaxy up to |m| ~ 0.5
    flux_ratio = b_source.stamps.sum((1, 2)) / b_image.stamps.sum((1, 2))
    assert np.all(np.abs(flux_ratio - 1) < 0.06), flux_ratio  # the same galaxies, the same mask level
