"""ShearRegressor: trains on CPU, logs finite slash-named metrics, predicts, checkpoints safely."""

import functools
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from wlshear.models import PaperCNN, ShearRegressor, linear_bias_fit, load_estimator, refit_head


def _loaders(n=64, batch=16, with_meta=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, 32, generator=g).abs() * 0.01
    y = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.2
    tensors = (x, y, torch.arange(n)) if with_meta else (x, y)
    ds = TensorDataset(*tensors)
    return DataLoader(ds, batch_size=batch), DataLoader(ds, batch_size=batch)


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_linear_bias_fit_recovers_m_c():
    rng = np.random.default_rng(0)
    t = torch.from_numpy(rng.uniform(-0.2, 0.2, size=(5000, 2)))
    pred = t * torch.tensor([1.1, 0.7], dtype=torch.float64) + torch.tensor([0.01, -0.02], dtype=torch.float64)
    fit = linear_bias_fit(pred, t)
    np.testing.assert_allclose(fit["m"].numpy(), [0.1, -0.3], atol=1e-10)
    np.testing.assert_allclose(fit["c"].numpy(), [0.01, -0.02], atol=1e-10)
    np.testing.assert_allclose(fit["sigma"].numpy(), [0, 0], atol=1e-10)


def test_training_logs_finite_val_metrics(tmp_path):
    torch.manual_seed(0)
    optimizer = functools.partial(torch.optim.RMSprop, lr=3e-4, alpha=0.9, eps=1e-8)
    scheduler = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.31622776,
                                  patience=10, min_lr=2e-6)
    model = ShearRegressor(PaperCNN(), optimizer=optimizer, scheduler=scheduler, symmetrize_eval=True)
    train, val = _loaders()
    trainer = _trainer(max_steps=8, num_sanity_val_steps=0)  # 4 batches/epoch -> 2 epochs, 2 validations
    trainer.fit(model, train, val)
    metrics = trainer.callback_metrics
    names = ["train/loss", "val/loss", "val/rmse_g1", "val/rmse_g2", "val/m1", "val/m2", "val/c1", "val/c2"]
    for name in names:
        assert name in metrics, f"{name} not logged; got {sorted(metrics)}"
        assert math.isfinite(float(metrics[name])), name
    # rmse is consistent with the epoch mean of the MSE loss (equal batch sizes)
    mse = 0.5 * (float(metrics["val/rmse_g1"]) ** 2 + float(metrics["val/rmse_g2"]) ** 2)
    assert abs(mse - float(metrics["val/loss"])) < 1e-5
    assert model.hparams.scheduler_monitor == "val/loss" and "RMSprop" in model.hparams.optimizer_desc

    test_metrics = trainer.test(model, val, verbose=False)[0]
    assert all(math.isfinite(test_metrics[f"test/{k}"]) for k in ("loss", "m1", "c2", "rmse_g1"))

    preds = torch.cat(trainer.predict(model, val))
    assert preds.shape == (64, 2) and torch.isfinite(preds).all()

    # the checkpoint loads with torch's safe default (weights_only=True) and as an estimator
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    est = load_estimator(ckpt)
    x = val.dataset.tensors[0]
    np.testing.assert_allclose(est.predict(x, symmetrize=True), preds.numpy(), atol=1e-5)
    again = ShearRegressor.load_from_checkpoint(ckpt, net=PaperCNN())
    assert again.hparams.symmetrize_eval is True

    # head refit of a trainer-attached module returns a detached copy of the same type
    refit, diag = refit_head(model, val, progress=False)
    assert isinstance(refit, ShearRegressor) and refit._trainer is None and model._trainer is trainer
    assert not torch.equal(refit.net.head.weight, model.net.head.weight) and diag["n"] == 64
    assert torch.isfinite(refit.predict_shear(x[:4], symmetrize=False)).all()


def test_default_optimizer_and_channel_axis_input():
    model = ShearRegressor(PaperCNN(), optimizer=None, scheduler=None)
    train, _ = _loaders(n=32, with_meta=False)
    x, y = next(iter(train))
    assert model(x.unsqueeze(1)).shape == model(x).shape == (16, 2)
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, train)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    with pytest.raises(ValueError, match="true shears"):
        model._xy((x,))


def test_hydra_config_instantiates_module():
    """The project's own conf/model/paper_cnn.yaml builds the paper's optimiser and schedule."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "model" / "paper_cnn.yaml"
    cfg = OmegaConf.load(conf)
    cfg.shear_max = 0.2  # interpolated from data.augment.shear_max in a full composition
    model = instantiate(cfg)
    opt_cfg = model.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults["alpha"] == 0.9 and opt.defaults["lr"] == 3e-4
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) and sched.patience == 10
    assert opt_cfg["lr_scheduler"]["monitor"] == "val/loss"
    assert model.hparams.net_spec["class_path"].endswith("PaperCNN")


def test_symmetrize_train_optimises_the_equivariant_average():
    """With symmetrize_train the training loss is the MSE of the 8-fold average, so a quarter-turned
    batch with its shears mapped (g -> -g) gives the same loss; without it the plain net's loss differs."""
    from wlshear.models import symmetry

    torch.manual_seed(0)
    x = torch.randn(6, 32, 32)
    y = 0.1 * torch.randn(6, 2)
    xr = symmetry.apply(x, 1)  # one quarter-turn
    yr = y * torch.as_tensor(symmetry.shear_sign(1), dtype=y.dtype)
    for flag, same in ((True, True), (False, False)):
        torch.manual_seed(1)
        mod = ShearRegressor(PaperCNN(dropout=0.0), symmetrize_train=flag).eval()
        a, b = mod.training_step((x, y), 0), mod.training_step((xr, yr), 0)
        assert torch.isclose(a, b, rtol=1e-5).item() is same, (flag, a, b)
        if flag:
            expect = torch.nn.functional.mse_loss(mod.predict_shear(x, symmetrize=True), y)
            assert torch.isclose(a, expect, rtol=1e-6)
