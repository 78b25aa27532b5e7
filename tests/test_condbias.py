"""Conditional bias (issue #8): calibration surface, estimator integration, objective, grouped stream,
and evaluate's conditional study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wlshear.calibration import CalibrationSurface, fit_surface
from wlshear.metrics.bias import fit_bias
from wlshear.metrics.conditional import conditional_rows, pair_mean_observable
from wlshear.models.architectures import PaperCNN
from wlshear.models.estimator import ShearEstimator, load_estimator
from wlshear.sim.constants import FAST_GSPARAMS
from wlshear.models.objectives import ConditionalBiasLoss, MSEObjective, group_slopes

FAST_GSP = FAST_GSPARAMS


def _synthetic(n=20000, seed=0, noise=0.03):
    """Ring pairs with g_est = (1 + m(mag)) g + c(mag) + shape (cancels in pairs) + noise."""
    rng = np.random.default_rng(seed)
    mag = rng.uniform(22.0, 27.0, n)
    hlr = 10 ** rng.normal(0.4, 0.2, n)
    g = rng.uniform(-0.2, 0.2, (n, 2))
    m = 0.15 - 0.1 * (mag - 24.5)           # +0.40 at mag 22, -0.10 at 27
    c = 0.003 * (mag - 24.5)
    e = rng.normal(0, 0.25, (n, 2))
    mean = (1 + m[:, None]) * g + c[:, None]
    g_true = np.concatenate([g, g])
    g_est = np.concatenate([mean + e, mean - e]) + rng.normal(0, noise, (2 * n, 2))
    obs = {"mag": np.concatenate([mag, mag]), "hlr_px": np.concatenate([hlr, hlr]),
           "snr": np.concatenate([10 ** (30 - mag) / 1e4] * 2)}
    pid = np.concatenate([np.arange(n), np.arange(n)])
    return g_true, g_est, obs, pid, (lambda x: 0.15 - 0.1 * (x - 24.5)), (lambda x: 0.003 * (x - 24.5))


def _bins(x, g_true, g_est, pid, nb=5):
    edges = np.quantile(x, np.linspace(0, 1, nb + 1))
    out = []
    for b in range(nb):
        sel = (x >= edges[b]) & (x <= edges[b + 1])
        out.append(fit_bias(g_true[sel], g_est[sel], pair_ids=pid[sel]))
    return out


@pytest.mark.parametrize("basis", ["poly", "linear"])
def test_surface_recovers_injected_bias(basis):
    g_true, g_est, obs, pid, m_of, c_of = _synthetic()
    surf = fit_surface(g_true, g_est, obs, pair_ids=pid, basis=basis, degree=2, n_knots=4)
    grid = np.array([22.5, 23.5, 24.5, 25.5, 26.5])
    m, c = surf.m_c({"mag": grid, "hlr_px": np.full(5, 2.5), "snr": np.ones(5)})
    assert np.allclose(m[:, 0], m_of(grid), atol=0.02) and np.allclose(m[:, 1], m_of(grid), atol=0.02)
    assert np.allclose(c[:, 0], c_of(grid), atol=1.5e-3)
    # before: strongly magnitude-dependent m; after: consistent with 0 in every magnitude bin
    before = _bins(obs["mag"], g_true, g_est, pid)
    assert before[0].m[0] > 0.2 and before[-1].m[0] < -0.02
    after = _bins(obs["mag"], g_true, surf.apply(g_est, obs), pid)
    for f in after:
        assert np.all(np.abs(f.m) < 4 * f.m_err + 0.005), (f.m, f.m_err)
        assert np.all(np.abs(f.c) < 4 * f.c_err + 5e-4), (f.c, f.c_err)


def test_surface_save_load_and_bad_input(tmp_path):
    g_true, g_est, obs, pid, *_ = _synthetic(n=3000)
    surf = fit_surface(g_true, g_est, obs, pair_ids=pid, features=("mag", "log10_hlr", "log10_snr"))
    path = surf.save(tmp_path / "s.json")
    back = CalibrationSurface.load(path)
    assert np.allclose(back.apply(g_est, obs), surf.apply(g_est, obs))
    # an unmeasurable magnitude (flux <= 0) is filled with the sample median, not NaN
    obs_bad = {k: v[:4].copy() for k, v in obs.items()}
    obs_bad["mag"][0] = np.nan
    assert np.all(np.isfinite(surf.apply(g_est[:4], obs_bad)))
    with pytest.raises(FileNotFoundError, match="fit_surface"):
        CalibrationSurface.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown surface feature"):
        fit_surface(g_true, g_est, obs, features=("colour",))


def test_estimator_with_surface_roundtrip(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    # stamps of very different brightness, so the measured magnitude spans the surface
    yy, xx = np.mgrid[:32, :32] - 15.5
    prof = np.exp(-(xx**2 + yy**2) / (2 * 2.5**2))
    amp = 10 ** rng.uniform(-1.5, 0.5, 64)
    stamps = (amp[:, None, None] * prof + rng.normal(0, 0.004, (64, 32, 32))).astype(np.float32)
    est = ShearEstimator(PaperCNN(), calibration={"m1": 0.05, "c2": 0.001})
    plain = est.predict(stamps, symmetrize=False)
    # a surface with a strong magnitude dependence of m
    from wlshear.observables import measure_observables

    obs = measure_observables(stamps)
    surf = CalibrationSurface(["mag"], basis="poly", degree=1, center=[float(np.nanmedian(obs["mag"]))],
                              scale=[1.0], lo=[-np.inf], hi=[np.inf], fill=[24.0],
                              coef_m=[[0.0, 0.2], [0.0, 0.2]], coef_c=[[0.001, 0.0], [0.0, 0.0]])
    est.set_surface(surf)
    with_surf = est.predict(stamps, symmetrize=False)
    assert not np.allclose(with_surf, plain)
    assert np.allclose(est.predict(stamps, symmetrize=False, apply_surface=False), plain)
    expected = surf.apply(plain, obs)
    assert np.allclose(with_surf, expected)
    est.save(tmp_path / "e.pt")
    back = load_estimator(tmp_path / "e.pt")  # weights_only=True still works
    assert back.surface is not None and back.surface.features == ["mag"]
    assert np.allclose(back.predict(stamps, symmetrize=False), with_surf, atol=1e-6)
    # older files (no "surface" key) load without a surface
    ShearEstimator(PaperCNN()).save(tmp_path / "old.pt")
    assert load_estimator(tmp_path / "old.pt").surface is None


def test_objective_penalty():
    torch.manual_seed(0)
    groups = torch.arange(200).repeat_interleave(8)
    g = torch.rand(1600, 2) * 0.4 - 0.2
    shape = (torch.randn(200, 2) * 0.25)[groups]   # per-galaxy intrinsic shape: an intercept, not a slope
    loss = ConditionalBiasLoss(slope_weight=1.0)
    unbiased = g + shape
    shrunk = 0.8 * g + shape
    p0 = loss.penalty(unbiased, g, groups)
    p1 = loss.penalty(shrunk, g, groups)
    assert float(p0) < 1e-10
    assert float(p1) == pytest.approx(0.04, rel=1e-4)
    slope, var, valid = group_slopes(shrunk, g, groups)
    assert torch.allclose(slope, torch.full_like(slope, 0.8), atol=1e-5) and bool(valid.all())
    # noisy predictions: the debiased penalty is ~0 on average for an unbiased estimator
    noisy = unbiased + 0.05 * torch.randn_like(g)
    assert float(ConditionalBiasLoss(debias=True).penalty(noisy, g, groups)) == pytest.approx(0.0, abs=0.02)
    # without debiasing the slope noise (~0.05^2 / Sxx ~ 0.027) inflates the penalty
    assert float(ConditionalBiasLoss(debias=False).penalty(noisy, g, groups)) > 0.015
    # full loss: MSE term + penalty; without groups it is the MSE
    total, parts = loss(shrunk, g, groups)
    assert float(total) == pytest.approx(float(parts["mse"] + parts["slope_penalty"]), rel=1e-6)
    assert float(loss(shrunk, g, None)[0]) == pytest.approx(float(MSEObjective()(shrunk, g)[0]))
    from wlshear.models.module import ShearRegressor

    assert isinstance(ShearRegressor(PaperCNN()).objective, MSEObjective)  # the default: the paper's loss
    with pytest.raises(ValueError, match="objective must be a callable"):
        ShearRegressor(PaperCNN(), objective="huber")


def _tiny_renderer(noise=True):
    from wlshear.sim.augment import Augmentation
    from wlshear.sim.noise import CorrelatedNoise
    from wlshear.sim.render import StampRenderer
    from wlshear.sim.sources import ParametricSource

    src = ParametricSource(n_galaxies=50, p_knots=0.0, gsparams=FAST_GSP)
    return StampRenderer(src, CorrelatedNoise() if noise else None, Augmentation(), gsparams=FAST_GSP)


@pytest.mark.parametrize("same_noise", [True, False])
def test_grouped_stream(same_noise):
    from wlshear.data.datasets import GroupedShearStream

    k = 4
    ds = GroupedShearStream(_tiny_renderer(), samples_per_epoch=24, group_size=k, seed=3, chunk=16,
                            return_meta=True, same_noise=same_noise)
    items = list(ds)
    assert len(items) == len(ds) == 6
    for x, y, meta in items:
        assert x.shape == (k, 32, 32) and y.shape == (k, 2)
        for key in ("galaxy_id", "rotation", "mirror", "mu", "dx", "dy"):
            assert np.all(meta[key] == meta[key][0]), key
        assert len(np.unique(y[:, 0].numpy())) == k and len(np.unique(y[:, 1].numpy())) == k
    # different galaxies across groups; reproducible for the same seed
    assert len({int(m["galaxy_id"][0]) for _, _, m in items}) > 1
    again = list(GroupedShearStream(_tiny_renderer(), 24, group_size=k, seed=3, chunk=16, same_noise=same_noise))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(items, again))
    # shared noise: stamps of a group differ only through the shear (far less than the noise)
    x = items[0][0].numpy()
    border = np.ones((32, 32), bool)
    border[6:-6, 6:-6] = False
    d = np.std((x[0] - x[1])[border])
    assert (d < 1e-3) if same_noise else (d > 1e-3)


def test_regressor_trains_on_groups():
    from wlshear.models.module import ShearRegressor

    torch.manual_seed(0)
    model = ShearRegressor(PaperCNN(), objective=ConditionalBiasLoss(slope_weight=1.0))
    x = torch.randn(3, 4, 32, 32)
    y = torch.rand(3, 4, 2) * 0.4 - 0.2
    loss = model.training_step((x, y), 0)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert model.hparams["objective_desc"].startswith("ConditionalBiasLoss")


def test_conditional_rows_pairs_share_bins():
    g_true, g_est, obs, pid, *_ = _synthetic(n=2000)
    rng = np.random.default_rng(5)
    obs = {k: v + rng.normal(0, 0.05, v.shape) for k, v in obs.items()}  # members measured differently
    x = pair_mean_observable(obs["mag"], pid)
    assert np.allclose(x[:2000], x[2000:])
    rows = conditional_rows(g_true, {"est": (g_est, None)}, obs, pid, {"mag": 4, "hlr_px": 2})
    mag_rows = [r for r in rows if r["observable"] == "mag"]
    assert len(mag_rows) == 4 and sum(r["n"] for r in mag_rows) == 4000
    assert all(r["n_pairs"] * 2 == r["n"] for r in mag_rows)
    assert mag_rows[0]["m1"] > mag_rows[-1]["m1"] + 0.2   # injected trend seen in observed-mag bins


def test_evaluate_conditional_study(tmp_path):
    from hydra import compose, initialize_config_dir

    from wlshear.tasks.evaluate import run

    repo = Path(__file__).resolve().parents[1]
    est_path = ShearEstimator(PaperCNN()).save(tmp_path / "run" / "estimator.pt")
    over = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}",
            f"paths.cache_dir={tmp_path / 'cache'}", "extras.print_config=false",
            "data.source.n_galaxies=100", "data.source.p_knots=0.0", "test.n=48", "bootstrap=0",
            f"run_dir={est_path.parent}", "baselines=[moments]", "studies.baselines=[moments]",
            "symmetrize=[true]", "plots.scatter=false",
            "studies.centroid.enabled=false", "studies.background.enabled=false", "studies.noise.enabled=false",
            "studies.shear.enabled=false", "studies.magnitude.enabled=false",
            "studies.conditional.bins={mag: 3, hlr_px: 2, snr: 2}"]
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        cfg = compose("evaluate.yaml", overrides=over)
    res = run(cfg)
    out = tmp_path / "out"
    assert (out / "conditional_bins.csv").is_file() and (out / "conditional_bins.png").is_file()
    rows = json.loads((out / "results.json").read_text())["studies"]["conditional_bins"]["rows"]
    assert {r["estimator"] for r in rows} == {"cnn_sym", "moments"}
    assert {r["observable"] for r in rows} == {"mag", "hlr_px", "snr"}
    mag = [r for r in rows if r["observable"] == "mag" and r["estimator"] == "moments"]
    assert len(mag) == 3 and sum(r["n"] for r in mag) == res["test_set"]["n"]
    assert all("m1_err" in r and "c2" in r for r in mag)


def test_train_task_with_condbias_objective(tmp_path):
    """train.py end to end with model=paper_cnn_condbias data=grouped, fine-tuning from a file."""
    from hydra import compose, initialize_config_dir

    from wlshear.tasks.train import run

    repo = Path(__file__).resolve().parents[1]
    init = ShearEstimator(PaperCNN()).save(tmp_path / "init.pt")
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}", "debug=fast", "model=paper_cnn_condbias", "data=grouped",
            "data.group_size=4", "data.samples_per_epoch=64", "data.val_size=16", "data.test_size=16",
            "refit.n=48", f"model.init_from={init}"])
    assert cfg.data._target_.endswith("GroupedShearDataModule") and cfg.model.objective._target_.endswith("ConditionalBiasLoss")
    metrics = run(cfg)
    assert np.isfinite(metrics["val_mse"])
    est = load_estimator(tmp_path / "run" / "estimator.pt")
    assert est.metadata["config"]["model"]["objective"]["_target_"].endswith("ConditionalBiasLoss")
    assert est.metadata["config"]["model"]["objective"]["slope_weight"] == 5.0


def test_select_surface_prefers_adequate_model():
    """Held-out selection: a quadratic m(mag) is not captured by a one-stage linear surface, and the
    selected candidate leaves no detectable conditional bias on an independent set."""
    from wlshear.calibration import residual_chi2, select_surface

    rng = np.random.default_rng(3)
    n = 20000
    mag = rng.uniform(22.0, 27.0, n)
    hlr = 10 ** rng.normal(0.4, 0.2, n)
    g = rng.uniform(-0.2, 0.2, (n, 2))
    m = 0.2 - 0.04 * (mag - 24.5) ** 2
    e = rng.normal(0, 0.25, (n, 2))
    mean = (1 + m[:, None]) * g
    g_true = np.concatenate([g, g])
    g_est = np.concatenate([mean + e, mean - e]) + rng.normal(0, 0.02, (2 * n, 2))
    obs = {"mag": np.concatenate([mag, mag]), "hlr_px": np.concatenate([hlr, hlr]), "snr": np.full(2 * n, 10.0)}
    pid = np.concatenate([np.arange(n), np.arange(n)])
    cands = [{"basis": "poly", "degree": 1, "n_stages": 1}, {"basis": "poly", "degree": 2, "n_stages": 1}]
    surf, best, table = select_surface(g_true, g_est, obs, pid, candidates=cands, seed=0)
    assert best["degree"] == 2 and len(table) == 2 and table[0]["chi2"] < table[1]["chi2"]
    assert surf.diagnostics["n_fit"] == n and "selection" in surf.diagnostics
    before = residual_chi2(g_true, g_est, obs, pid)
    after = residual_chi2(g_true, surf.apply(g_est, obs), obs, pid)
    assert before["chi2"] > 10 * before["dof"] and after["chi2"] < 3 * after["dof"]
    with pytest.raises(ValueError, match="holdout_fraction"):
        select_surface(g_true, g_est, obs, pid, candidates=cands, holdout_fraction=1.0)
