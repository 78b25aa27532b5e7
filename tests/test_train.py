"""train.py through Hydra compose: smoke run (train, refit, evaluate) and a learning check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import wlshear
from wlshear.tasks.train import run

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _cfg(tmp_path, overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train.yaml", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}", *overrides,
        ])


def test_smoke_train_refit_evaluate(tmp_path):
    cfg = _cfg(tmp_path, ["debug=fast", "data.samples_per_epoch=48", "data.val_size=24", "data.test_size=24",
                          "refit.n=48", "trainer.max_epochs=1"])
    metrics = run(cfg)
    out = tmp_path / "run"
    for f in ("config_resolved.yaml", "metrics.json", "estimator.pt", "estimator_refit.pt",
              "checkpoints/refit.ckpt", "checkpoints/last.ckpt", "shear_scatter.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "metrics.json").read_text())
    for k in ("m1", "m2", "c1", "c2", "sigma1", "sigma2"):
        assert math.isfinite(saved["summary"][k]), k
    assert math.isfinite(metrics["val_mse"]) and saved["refit"]["n"] == 48
    # the default baselines ran on the same test stamps: a row each (or a recorded reason)
    base = saved["summary"]["baselines"]
    assert set(base) | set(saved.get("baselines_skipped", {})) == {"moments", "fpfs"}
    assert math.isfinite(base["moments"]["sigma1"]) and saved["test"]["moments"]["n_total"] == 24
    # the Hydra-free loading API
    est = wlshear.load_estimator(out / "estimator_refit.pt")
    g = est.predict(np.random.default_rng(0).normal(size=(5, 32, 32)).astype(np.float32), symmetrize=True)
    assert g.shape == (5, 2) and np.all(np.isfinite(g))
    # the default symmetric refit (ring-paired refit stamps): c = 0 by construction, so the
    # calibrated estimator is exactly equivariant under the 8 symmetries of the square
    assert saved["refit"]["symmetric"] is True
    assert est.calibration["c1"] == 0.0 and est.calibration["c2"] == 0.0 and est.calibration["m1"] != 0.0
    from wlshear.models.symmetry import apply_np, shear_sign

    x = np.random.default_rng(1).normal(size=(6, 32, 32)).astype(np.float32)
    g0 = est.predict(x, symmetrize=True)
    for k in range(8):
        gk = est.predict(np.ascontiguousarray(apply_np(x, k)), symmetrize=True)
        # float32 summation order only (a few-step network's outputs can be ~10: relative tolerance)
        assert np.abs(gk - g0 * np.array(shear_sign(k))).max() < 1e-5 * max(1.0, np.abs(g0).max()), k
    # a second run reuses the cached evaluation sets
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_refit_size_is_checked_before_training(tmp_path):
    """debug=fast's refit size follows the architecture; an explicit size the wide head cannot be
    refit with stops the run at start (no training, no checkpoint), naming refit.n and the minimum."""
    cfg = _cfg(tmp_path, ["debug=fast", "model=wide_cnn"])
    assert cfg.refit.n == "auto"
    cfg = _cfg(tmp_path, ["debug=fast", "model=wide_cnn", "refit.n=64"])
    with pytest.raises(ValueError, match=r"refit.n=64 .*refit.n >= 66"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_short_run_learns_on_low_noise_simple_galaxies(tmp_path):
    """Bright, simple, nearly round Sersic galaxies at a quarter of the CLASH noise: a short run must
    cut the validation MSE far below the prior variance 0.2^2/3 = 0.0133 (an untrained net sits at
    or above it). Intrinsic ellipticities are small (e_sigma 0.05) so that shape noise does not
    floor the MSE near the prior (with e_sigma 0.25 the Bayes floor is ~0.011)."""
    cfg = _cfg(tmp_path, [
        "debug=fast", "data/source=parametric", "data.noise_scale=0.25", "data.source.p_bulge_disk=0", "data.source.mag_mean=23",
        "data.source.mag_sd=0.5", "data.source.hlr_median_px=3.5", "data.source.n_galaxies=300", "data.source.e_sigma=0.05",
        "data.augment.shift=0.5", "data.augment.magnification=null",
        "data.samples_per_epoch=1600", "data.val_size=400", "data.batch_size=32",
        "trainer.max_epochs=4", "refit.enabled=false", "evaluate.enabled=false",
        "model.optimizer.lr=1e-3", "seed=1",
    ])
    metrics = run(cfg)
    assert metrics["val_mse"] < 0.5 * metrics["val_mse_prior"], metrics["val_mse"]


def test_run_restores_the_float32_matmul_precision(tmp_path):
    """train.run trains with 'medium' matmul precision (bf16 on CPUs that have it) but must not leave
    it set: later code in the process (metacal, evaluate) would silently lose precision."""
    import torch

    before = torch.get_float32_matmul_precision()
    run(_cfg(tmp_path, ["debug=fast", "refit.enabled=false", "evaluate.enabled=false"]))
    assert torch.get_float32_matmul_precision() == before
