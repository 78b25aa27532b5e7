"""evaluate.py end to end through Hydra compose on a tiny checkpoint and tiny sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from wlshear.models.architectures import PaperCNN, net_spec
from wlshear.models.estimator import ShearEstimator
from wlshear.metrics.bias import bias_summary, pair_bootstrap_sigma
from wlshear.tasks.estimators import resolve_checkpoints
from wlshear.tasks.evaluate import run

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, overrides: list[str]):
    base = [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "extras.print_config=false",
        "data.source.n_galaxies=200",
        "data.source.p_knots=0.0",
        "test.n=32",
        "bootstrap=20",
        "studies.centroid.n=16",
        "studies.centroid.shifts_hlr=[0.0,0.8]",
        "studies.background.offsets_sigma=[0.0,2.0]",
        "studies.noise.n=16",
        "studies.noise.levels=[1.0,0.25]",
        "studies.shear.bins=4",
        "studies.magnitude.bins=2",
        "studies.metacal.n=16",
        "studies.metacal.real.n_orient=1",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate.yaml", overrides=base + overrides)


def test_evaluate_end_to_end(tmp_path):
    # the network's random weights must not depend on which tests ran before (the global torch RNG):
    # the background-offset invariance below holds to float32 rounding, which the weights scale
    torch.manual_seed(0)
    est_path = ShearEstimator(PaperCNN(), calibration={"m1": 0.1}).save(tmp_path / "run" / "estimator.pt")
    # a Lightning-style checkpoint of a ShearRegressor (net_spec in hparams, "net." weights)
    net = PaperCNN()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"net_spec": net_spec(net)}}, ckpt)
    cfg = _cfg(tmp_path, [f"run_dir={est_path.parent}", f"checkpoints={{lit: {ckpt}}}",
                          f"studies.noise.checkpoints={{0.25: {est_path}}}"])
    res = run(cfg)
    out = tmp_path / "out"
    for name in ("results.json", "summary.md", "table.csv", "config_resolved.yaml",
                 "magnitude_bins.csv", "magnitude_bins.png", "shear_bins.csv", "shear_bins.png",
                 "centroid_shift.csv", "centroid_shift.png", "background_offset.csv",
                 "background_offset.png", "noise_levels.csv", "noise_levels.png",
                 "scatter_cnn_sym.png", "scatter_moments.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    est = data["estimators"]
    # CNN with and without symmetry averaging, and the default (fast) baselines on the same stamps
    for name in ("cnn", "cnn_sym", "lit", "lit_sym", "moments"):
        assert name in est, name
        assert est[name]["n_total"] == data["test_set"]["n"]
        assert 0 <= est[name]["n_failed"] <= est[name]["n_total"]
    assert "fpfs" in est or "fpfs" in data["skipped"]
    assert "ksb" not in est and "regauss" not in est
    # the default sets are drawn by the torch backend and checked against GalSim in the same run
    ts = data["test_set"]
    assert ts["backend"] == "torch"
    check = ts["backend_check"]
    assert check["backend"] == "torch" and check["reference"] == "galsim"
    assert check["n"] == ts["n"] and check["n_failed"] == 0
    # same galaxies, two renderers: they agree to a small fraction of the peak
    assert 0 < check["residual_over_peak"]["max"] < 0.02
    assert check["flux_ratio_median"] == pytest.approx(1.0, abs=0.01)
    assert set(check["cnn"]) == {"cnn_sym", "lit_sym"}
    for c in check["cnn"].values():
        assert np.all(np.isfinite(c["dg_rms"])) and max(c["dg_rms"]) < 0.05
    # ring pairs: m, c from the pair-averaged fit (16 pairs)
    assert est["cnn_sym"]["paired"] and est["cnn_sym"]["n_pairs"] == data["test_set"]["n"] // 2
    summary = (out / "summary.md").read_text()
    assert "| estimator | m1 | m2 | c1 | c2 | sigma1 | sigma2 | failures |" in summary
    assert "| cnn_sym |" in summary and "skipped" in summary
    # a constant background offset cannot change the per-stamp-normalised CNN's estimates
    rows = [r for r in data["studies"]["background_offset"]["rows"] if r["estimator"] == "cnn_sym"]
    assert len(rows) == 2
    assert rows[0]["sigma1"] == pytest.approx(rows[1]["sigma1"], rel=1e-3)
    # noise study: the main CNNs at every level, plus the per-level model where one is given
    noise_rows = data["studies"]["noise_levels"]["rows"]
    matched = {r["noise_scale"] for r in noise_rows if r["estimator"] == "cnn_matched_sym"}
    assert matched == {0.25}
    assert {r["noise_scale"] for r in noise_rows if r["estimator"] == "cnn_sym"} == {1.0, 0.25}
    assert res["test_set"]["n"] == data["test_set"]["n"]


def test_paper_preset_draws_galsim_sets_with_every_baseline(tmp_path):
    """evaluate=paper: the paper's protocol (150,000 GalSim stamps, every baseline); run here on
    a tiny test set with the studies off."""
    torch.manual_seed(0)
    est_path = ShearEstimator(PaperCNN()).save(tmp_path / "run" / "estimator.pt")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        full = compose("evaluate.yaml", overrides=["evaluate=paper"])
    assert full.test.n == 150000 and full.test.backend == "galsim" and full.test.check_n == 0
    assert set(full.baselines) == {"moments", "rrg", "ksb", "regauss", "fpfs", "wlenet"}
    assert set(full.studies.baselines) == set(full.baselines)
    off = [f"studies.{s}.enabled=false" for s in ("magnitude", "conditional", "shear", "centroid", "background", "noise", "metacal")]
    cfg = _cfg(tmp_path, ["evaluate=paper", f"run_dir={est_path.parent}", "test.n=16", *off])
    res = run(cfg)
    assert res["test_set"]["backend"] == "galsim" and res["test_set"]["backend_check"] is None
    for name in ("cnn_sym", "moments", "rrg", "ksb", "regauss"):
        assert res["estimators"][name]["n_total"] == 16, name
    # the released wlenet model is absent under this root_dir: skipped with a reason, not dropped
    assert "wlenet" in res["skipped"] and "not found" in res["skipped"]["wlenet"]


def test_missing_checkpoint_named(tmp_path):
    missing = tmp_path / "nowhere" / "estimator_refit.pt"
    cfg = _cfg(tmp_path, [f"+checkpoints.cnn_refit={missing}"])
    with pytest.raises(FileNotFoundError, match="nowhere/estimator_refit.pt"):
        run(cfg)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_checkpoints(run_dir=tmp_path / "nowhere")
    # a run directory without estimator files, and a missing per-noise-level model
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="estimator.pt"):
        resolve_checkpoints(run_dir=tmp_path / "empty_run")
    cfg = _cfg(tmp_path, [f"studies.noise.checkpoints={{0.5: {missing}}}"])
    with pytest.raises(FileNotFoundError, match="nowhere/estimator_refit.pt"):
        run(cfg)
    # baselines only (no CNN) is allowed, but a single single-model noise study says so
    cfg = _cfg(tmp_path, ["baselines=[moments]", "studies.baselines=[moments]",
                          "studies.centroid.enabled=false", "studies.background.enabled=false"])
    res = run(cfg)
    assert list(res["estimators"]) == ["moments"]
    assert any("same CNN" in n for n in res["notes"])


def test_ring_summary_recovers_bias():
    """Pair-averaged m is far more precise than the unpaired one, and sigma errors are sensible."""
    rng = np.random.default_rng(0)
    n = 4000
    g = rng.uniform(-0.2, 0.2, (n, 2))
    e = rng.normal(0, 0.25, (n, 2))
    g_true = np.concatenate([g, g])
    g_est = 1.05 * g_true + 0.002 + np.concatenate([e, -e]) + rng.normal(0, 0.01, (2 * n, 2))
    pid = np.concatenate([np.arange(n), np.arange(n)])
    s = bias_summary(g_true, g_est, pair_ids=pid, bootstrap=50, rng=1)
    assert s["paired"] and s["n_pairs"] == n
    assert s["m1"] == pytest.approx(0.05, abs=4 * s["m1_err"])
    assert s["m1_err"] < 2e-3
    assert s["sigma1"] == pytest.approx(0.25 / 1.05, rel=0.05)
    se = pair_bootstrap_sigma(g_true, g_est, groups=pid, n_boot=50, rng=2)
    assert 0 < se[0] < 0.01


def test_noise_study_takes_the_models_of_a_noise_sweep(tmp_path):
    """studies.noise.sweep_dir: every job of a train.py multirun gives its model at its
    data.noise_scale (the paper trained one model per noise level); explicit checkpoints win."""
    from wlshear.tasks.estimators import noise_level_checkpoints

    sweep = tmp_path / "multiruns" / "t"
    for job, level in enumerate((1.0, 0.5, 0.25)):
        d = sweep / str(job)
        ShearEstimator(PaperCNN()).save(d / "estimator_refit.pt")
        (d / "config_resolved.yaml").write_text(f"data:\n  noise_scale: {level}\n")
    (sweep / "3").mkdir()  # a job that wrote nothing (failed): ignored
    found = noise_level_checkpoints({"sweep_dir": str(sweep)})
    assert found == {1.0: sweep / "0" / "estimator_refit.pt", 0.5: sweep / "1" / "estimator_refit.pt",
                     0.25: sweep / "2" / "estimator_refit.pt"}
    other = ShearEstimator(PaperCNN()).save(tmp_path / "other" / "estimator_refit.pt")
    mixed = noise_level_checkpoints({"sweep_dir": str(sweep), "checkpoints": {0.5: str(other)}})
    assert mixed[0.5] == other and mixed[1.0] == found[1.0]
    (sweep / "4").mkdir()
    ShearEstimator(PaperCNN()).save(sweep / "4" / "estimator_refit.pt")
    (sweep / "4" / "config_resolved.yaml").write_text("data:\n  noise_scale: 0.5\n")
    with pytest.raises(ValueError, match="both trained at noise_scale 0.5"):
        noise_level_checkpoints({"sweep_dir": str(sweep)})
    with pytest.raises(FileNotFoundError, match="not a directory"):
        noise_level_checkpoints({"sweep_dir": str(tmp_path / "nowhere")})
    # composed from the config, as evaluate.py does
    cfg = _cfg(tmp_path, [f"studies.noise.sweep_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="sweep_dir"):
        run(cfg)
