"""Training task: fit the CNN, refit its head, evaluate on the cached test set.

Run-directory outputs:
- ``config_resolved.yaml`` and ``config_tree.txt``: the resolved config;
- ``checkpoints/``: Lightning checkpoints (best, last) and ``refit.ckpt`` (the refit model);
- ``estimator.pt`` (trained net, no refit) and ``estimator_refit.pt`` (refit + calibration):
  self-contained files for ``wlshear.load_estimator``;
- ``metrics.json``: validation MSE, refit diagnostics and m, c, sigma per component on the test set;
- ``shear_scatter.png``: estimated vs true shear on the test set.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from wlshear.metrics.bias import fit_bias
from wlshear.metrics.plots import plot_shear_scatter
from wlshear.models.estimator import ShearEstimator
from wlshear.models.refit import refit_head
from wlshear.utils.hydra import instantiate_group, print_config_tree, save_resolved_config, write_json

log = logging.getLogger(__name__)


def _predict(estimator: ShearEstimator, stamps: torch.Tensor, symmetrize: bool) -> np.ndarray:
    return estimator.predict(stamps, symmetrize=symmetrize, batch_size=2048)


def evaluate_estimator(estimator: ShearEstimator, test_set, symmetrize: bool = True) -> dict:
    """m, c (ring-pair averaged when the set has pairs) and per-galaxy sigma on a cached set."""
    g_true = test_set.batch.shear.astype(np.float64)
    g_est = _predict(estimator, test_set.stamps, symmetrize)
    pair_ids = test_set.meta.get("pair_id")
    paired = pair_ids is not None and len(np.unique(pair_ids)) < len(pair_ids)
    per_gal = fit_bias(g_true, g_est)
    out = per_gal.as_dict()
    if paired:
        pf = fit_bias(g_true, g_est, pair_ids=pair_ids).as_dict()
        for k in ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err"):
            out[k] = pf[k]
        out["bias_from_ring_pairs"] = True
    return out, g_est


def run(cfg: DictConfig) -> dict:
    """Train, refit, evaluate. Returns the metrics dict (also written to metrics.json)."""
    t0 = time.time()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out_dir)
    if cfg.get("extras", {}).get("print_config", False):
        print_config_tree(cfg, save_to=out_dir / "config_tree.txt")
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("medium")

    log.info("building data <%s>", cfg.data._target_)
    dm = instantiate(cfg.data)
    log.info("building model <%s>", cfg.model._target_)
    model = instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    hp = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(hp)

    metrics: dict = {"run_dir": str(out_dir)}
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    if best:
        log.info("loading best checkpoint %s", best)
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state)
        metrics["best_checkpoint"] = best
    if not trainer.is_global_zero:
        return metrics

    dm.setup("validate")
    model.eval()
    val = dm.val_set
    with torch.no_grad():
        val_pred = ShearEstimator(model.net).predict(val.stamps, symmetrize=False)
    val_mse = float(np.mean((val_pred - val.batch.shear) ** 2))
    metrics["val_mse"] = val_mse
    metrics["val_mse_prior"] = float(cfg.data.augment.shear_max**2 / 3)
    log.info("validation MSE %.5f (prior variance %.5f)", val_mse, metrics["val_mse_prior"])
    meta = {"config": hp, "val_mse": val_mse}
    ShearEstimator(model.net, metadata=meta).save(out_dir / "estimator.pt")

    estimator = ShearEstimator(model.net, metadata=meta)
    if cfg.refit.enabled:
        refit = dm.refit_set(cfg.refit.n)
        loader = torch.utils.data.DataLoader(refit, batch_size=cfg.refit.batch_size, shuffle=False)
        new_net, diag = refit_head(model.net, loader, shear_max=cfg.data.augment.shear_max, progress=True)
        metrics["refit"] = {k: v for k, v in diag.items() if np.ndim(v) == 0 or k in ("L", "m")}
        # final linear calibration of the symmetrised refit estimator, fitted on the refit set
        # (never on the test set)
        est = ShearEstimator(new_net, metadata=meta)
        cal = fit_bias(refit.batch.shear, est.predict(refit.stamps, symmetrize=cfg.evaluate.symmetrize))
        est.set_calibration(m1=cal.m[0], c1=cal.c[0], m2=cal.m[1], c2=cal.c[1])
        est.metadata["calibration_fit"] = cal.as_dict()
        est.metadata["refit"] = metrics["refit"]
        est.save(out_dir / "estimator_refit.pt")
        ckpt = {"state_dict": {f"net.{k}": v for k, v in new_net.state_dict().items()},
                "hyper_parameters": dict(model.hparams), "refit": metrics["refit"]}
        (out_dir / "checkpoints").mkdir(exist_ok=True)
        torch.save(ckpt, out_dir / "checkpoints" / "refit.ckpt")
        estimator = est
        metrics["calibration"] = est.calibration

    if cfg.evaluate.enabled:
        dm.setup("test")
        test = dm.test_set
        results = {}
        raw = ShearEstimator(model.net)
        results["cnn"], _ = evaluate_estimator(raw, test, symmetrize=False)
        results["cnn_sym"], _ = evaluate_estimator(raw, test, symmetrize=True)
        if cfg.refit.enabled:
            results["cnn_refit_sym"], g_est = evaluate_estimator(estimator, test, symmetrize=cfg.evaluate.symmetrize)
        else:
            g_est = _predict(raw, test.stamps, True)
        metrics["test"] = results
        best_key = "cnn_refit_sym" if cfg.refit.enabled else "cnn_sym"
        metrics["summary"] = {k: results[best_key][k] for k in ("m1", "m2", "c1", "c2", "sigma1", "sigma2")}
        plot_shear_scatter(test.batch.shear, g_est, out_dir / "shear_scatter.png",
                           title=f"{best_key} on {len(test)} test stamps")
        for name, r in results.items():
            log.info("%-14s m1=%+.3f+-%.3f m2=%+.3f+-%.3f c1=%+.4f c2=%+.4f sigma1=%.4f sigma2=%.4f", name,
                     r["m1"], r["m1_err"], r["m2"], r["m2_err"], r["c1"], r["c2"], r["sigma1"], r["sigma2"])
    metrics["wall_time_s"] = time.time() - t0
    write_json(metrics, out_dir / "metrics.json")
    log.info("wrote %s", out_dir / "metrics.json")
    return metrics
