"""Training task: fit the CNN, refit its head, evaluate on the cached test set.

Run-directory outputs:
- ``config_resolved.yaml`` and ``config_tree.txt``: the resolved config;
- ``checkpoints/``: Lightning checkpoints (best, last) and ``refit.ckpt`` (the refit model);
- ``estimator.pt`` (trained net, no refit) and ``estimator_refit.pt`` (refit + calibration):
  self-contained files for ``wlshear.load_estimator``;
- ``split.json``: the galaxy ids of the training and test sides (``data.split``);
- ``metrics.json``: validation MSE, refit diagnostics and m, c, sigma per component on the test set,
  beside the configured baselines on the same stamps (:mod:`wlshear.tasks.train_report`);
- ``shear_scatter.png``: estimated vs true shear on the test set;
- ``stamps_train.png`` / ``stamps_val.png``: grids of augmented training and validation stamps
  (also logged as images to TensorBoard / wandb when those loggers are configured);
- ``wandb_id.txt``: the wandb run id (with the wandb logger), so a resumed run continues it.

Resuming and the experiment loggers: :mod:`wlshear.tasks.tracking`. Only global rank 0 writes
run-dir files. A sweeper (``hparams_search``) minimises the metric named by ``optimized_metric``
(:func:`optimized_value`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from wlshear.metrics.bias import fit_bias
from wlshear.models.estimator import ShearEstimator
from wlshear.models.refit import refit_head, refit_sample_size
from wlshear.tasks.train_report import test_report
from wlshear.tasks.preflight import UntrainedError, check_required, check_will_train, untrained_hint
from wlshear.tasks.tracking import (
    build_loggers,
    finish_loggers,
    launch_rank,
    log_images,
    resolve_ckpt_path,
    stamp_grids,
)
from wlshear.utils.threads import cpu_training_threads
from wlshear.utils.hydra import instantiate_group, print_config_tree, save_resolved_config, write_json

log = logging.getLogger(__name__)

#: a refit calibration with 1 + m below this (outputs amplified > 5x) is written with a warning
MIN_RESPONSE = 0.2


def optimized_value(cfg: DictConfig, metrics: dict):
    """The value a sweeper minimises: ``metrics[optimized_metric]`` (a dotted path into metrics.json,
    e.g. ``val_mse`` or ``summary.sigma1``; default ``val_mse``)."""
    key = cfg.get("optimized_metric") or "val_mse"
    node: Any = metrics
    for part in str(key).split("."):
        if not isinstance(node, dict) or part not in node:
            if cfg.get("optimized_metric") is None:
                return None  # a run that wrote no val_mse (e.g. a DDP rank > 0) and nothing asked for one
            raise KeyError(f"optimized_metric={key!r} is not in this run's metrics.json (top-level keys: "
                           f"{sorted(metrics)})")
        node = node[part]
    return node


@dataclass
class _Run:
    """What a training run builds before fitting."""

    dm: Any
    model: Any
    trainer: L.Trainer
    loggers: list
    metacal_op: Any
    refit_n: int | None
    hp: dict
    ckpt_path: str | None

    @property
    def estimator_kwargs(self) -> dict:
        return dict(metacal=self.metacal_op, counterfactual_input=self.metacal_op is not None)


def _build(cfg: DictConfig, out_dir: Path) -> _Run:
    """Check the config, save it, and build the data, model, loggers and trainer."""
    check_required(cfg)
    if launch_rank() == 0:
        save_resolved_config(cfg, out_dir)
        if cfg.get("extras", {}).get("print_config", False):
            print_config_tree(cfg, save_to=out_dir / "config_tree.txt")
    ckpt_path = resolve_ckpt_path(cfg, out_dir)
    check_will_train(cfg, ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("medium")
    log.info("building data <%s>", cfg.data._target_)
    dm = instantiate(cfg.data)
    split = dm.split_ids() if hasattr(dm, "split_ids") else None
    if split is not None and launch_rank() == 0:
        write_json({**dm.split_config, "n_train": len(split["train"]), "n_test": len(split["test"]),
                    "train": split["train"].tolist(), "test": split["test"].tolist()}, out_dir / "split.json")
        log.info("galaxy-disjoint split: %d training, %d test galaxies", len(split["train"]), len(split["test"]))
    log.info("building model <%s>", cfg.model._target_)
    metacal_op = instantiate(cfg.metacal) if cfg.get("metacal") else None
    if metacal_op is not None:
        log.info("metacal: training, refit and validation on no-shear counterfactual images (%r)", metacal_op)
    model = instantiate(cfg.model, input_transform=metacal_op)
    refit_n = None
    if cfg.refit.enabled:  # checked before training: the refit size must suit this architecture
        refit_n = refit_sample_size(model.net, cfg.refit.n)
        log.info("head refit on %d stamps (refit.n=%s)", refit_n, cfg.refit.n)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = build_loggers(cfg, out_dir, ckpt_path)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    hp = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(hp)
    return _Run(dm, model, trainer, loggers, metacal_op, refit_n, hp, ckpt_path)


def _fit(cfg: DictConfig, run: _Run, metrics: dict) -> bool:
    """Train (unless ``train=false``) and load the best checkpoint; returns whether the network is
    untrained (no optimiser step changed its weights and it did not start from trained weights)."""
    model, trainer = run.model, run.trainer
    initial = [p.detach().clone() for p in model.parameters()]  # to tell whether training changed anything
    if cfg.get("train", True):
        on_cpu = getattr(trainer.strategy.root_device, "type", "cpu") == "cpu"
        with cpu_training_threads(int(getattr(run.dm.hparams, "num_workers", 0) or 0), on_cpu) as threads:
            if on_cpu:
                log.info("training on CPU with %d intra-op thread(s) beside %s DataLoader worker(s)", threads,
                         getattr(run.dm.hparams, "num_workers", 0))
            trainer.fit(model=model, datamodule=run.dm, ckpt_path=run.ckpt_path)
        metrics["resumed_from"] = run.ckpt_path
    elif run.ckpt_path:  # train=false: refit / evaluate the checkpoint's network as it is
        log.info("train=false: network weights from %s", run.ckpt_path)
        model.load_state_dict(torch.load(run.ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
        metrics["weights_from"] = run.ckpt_path
    # the refit, calibration and evaluation measure: full float32 products from here on (bf16 on
    # AMX CPUs adds ~2e-3 relative errors; wlshear.utils.precision); run() restores the caller's
    torch.set_float32_matmul_precision("highest")
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    if best:
        log.info("loading best checkpoint %s", best)
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state)
        metrics["best_checkpoint"] = best
    # weights, not trainer.global_step: under ddp_spawn the main process's counters stay at 0
    unchanged = all(torch.equal(a, b.detach().cpu()) for a, b in zip(initial, model.parameters()))
    return unchanged and not (cfg.get("model") or {}).get("init_from")


def _validate(cfg: DictConfig, run: _Run, metrics: dict, untrained: bool, out_dir: Path) -> dict:
    """Validation MSE of the trained net; writes estimator.pt; returns the estimator metadata."""
    dm, model = run.dm, run.model
    dm.setup("validate")
    model.eval()
    val = dm.val_set
    with torch.no_grad():
        # metacal runs: on the counterfactual images the network was validated on
        val_pred = ShearEstimator(model.net, **run.estimator_kwargs).predict(val.stamps, symmetrize=False)
    usable = np.isfinite(val_pred).all(axis=1)  # flagged stamps (e.g. fully masked) are NaN rows
    if not usable.all():
        metrics["val_flagged"] = int((~usable).sum())
    val_mse = float(np.mean((val_pred[usable] - val.batch.shear[usable]) ** 2))
    metrics["val_mse"] = val_mse
    metrics["val_mse_prior"] = dm.fit_renderer.augment.shear_var  # Var(g_i) of the prior the val set was drawn from
    log.info("validation MSE %.5f (prior variance %.5f)", val_mse, metrics["val_mse_prior"])
    meta = {"config": run.hp, "val_mse": val_mse, "untrained": bool(untrained), "calibrated": False}
    ShearEstimator(model.net, metadata=meta, **run.estimator_kwargs).save(out_dir / "estimator.pt")
    return meta


def _calibrate(est: ShearEstimator, refit, symmetrize: bool, symmetric: bool, metrics: dict):
    """Fit and set the final linear calibration of the symmetrised refit estimator on the refit set
    (never on the test set; ring pairs averaged when the set has them); returns the fit. A
    symmetric refit with the symmetry average gets c = 0 (zero by construction, so fixing it keeps
    the estimator exactly equivariant)."""
    pair_ids = refit.meta.get("pair_id") if refit.ring else None
    cal = fit_bias(refit.batch.shear, est.predict(refit.stamps, symmetrize=symmetrize), pair_ids=pair_ids,
                   through_origin=bool(symmetric and symmetrize))
    try:
        est.set_calibration(**cal.calibration())
        est.metadata["calibrated"] = True
        weak = [f"m{k + 1} = {cal.m[k]:+.3f}" for k in (0, 1) if 1 + cal.m[k] < MIN_RESPONSE]
        if weak:  # written, but never silently: the calibration amplifies a weak response
            msg = (f"the refit network responds weakly to shear ({', '.join(weak)}, 1 + m < {MIN_RESPONSE}): its "
                   "calibration multiplies outputs by > 5; train longer")
            log.warning(msg)
            metrics["calibration_warning"] = msg
    except ValueError as exc:  # e.g. an under-trained net with 1 + m <= 0: keep the run's results
        log.warning("refit calibration not applied (%s); estimator_refit.pt is uncalibrated", exc)
        metrics["calibration_error"] = str(exc)
    return cal


def _refit(cfg: DictConfig, run: _Run, meta: dict, metrics: dict, out_dir: Path) -> ShearEstimator:
    """Refit the head by least squares on the refit set, calibrate, write estimator_refit.pt and
    checkpoints/refit.ckpt; returns the refit estimator."""
    refit = run.dm.refit_set(run.refit_n, ring=bool(cfg.refit.get("ring", False)))
    loader = torch.utils.data.DataLoader(refit, batch_size=cfg.refit.batch_size, shuffle=False)
    if run.metacal_op is not None:
        loader = run.metacal_op.noshear_batches(loader, seed=int(cfg.seed))
    symmetric = bool(cfg.refit.get("symmetric", False))
    var_g = run.dm.fit_renderer.augment.shear_var  # Var(g_i) of the prior the refit set was drawn from
    new_net, diag = refit_head(run.model.net, loader, shear_max=cfg.data.augment.shear_max, var_g=var_g,
                               progress=True, symmetric=symmetric)
    metrics["refit"] = {k: v for k, v in diag.items() if np.ndim(v) == 0 or k in ("L", "m")}
    est = ShearEstimator(new_net, metadata=meta, **run.estimator_kwargs)
    cal = _calibrate(est, refit, cfg.evaluate.symmetrize, symmetric, metrics)
    est.metadata["calibration_fit"] = cal.as_dict()
    est.metadata["refit"] = metrics["refit"]
    est.save(out_dir / "estimator_refit.pt")
    ckpt = {"state_dict": {f"net.{k}": v for k, v in new_net.state_dict().items()},
            "hyper_parameters": dict(run.model.hparams),
            "refit": {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in metrics["refit"].items()}}
    (out_dir / "checkpoints").mkdir(exist_ok=True)
    torch.save(ckpt, out_dir / "checkpoints" / "refit.ckpt")
    metrics["calibration"] = est.calibration
    return est


def run(cfg: DictConfig) -> dict:
    """Train, refit, evaluate. Returns the metrics dict (also written to metrics.json).

    The run uses ``torch.set_float32_matmul_precision("medium")`` (bf16 matmuls where the CPU or GPU
    has them) and restores the process's setting when it ends, so code run after it in the same
    process (a notebook, the test suite, the next job of an in-process sweep) keeps full precision."""
    precision = torch.get_float32_matmul_precision()
    try:
        return _train(cfg)
    finally:
        torch.set_float32_matmul_precision(precision)


def _train(cfg: DictConfig) -> dict:
    t0 = time.time()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_ = _build(cfg, out_dir)
    metrics: dict = {"run_dir": str(out_dir)}
    untrained = _fit(cfg, run_, metrics)
    if not run_.trainer.is_global_zero:  # ranks > 0 stop here: only rank 0 evaluates and writes files
        return metrics
    if untrained:
        if not cfg.refit.get("allow_untrained", False):
            raise UntrainedError(untrained_hint(
                f"no optimiser step changed the network's weights (trainer.global_step = {run_.trainer.global_step} "
                f"after trainer.max_epochs = {cfg.trainer.get('max_epochs')})"))
        log.warning("refit.allow_untrained: writing estimators of an untrained network (marked untrained)")
    meta = _validate(cfg, run_, metrics, untrained, out_dir)
    estimator = ShearEstimator(run_.model.net, metadata=meta, **run_.estimator_kwargs)
    if cfg.refit.enabled:
        estimator = _refit(cfg, run_, meta, metrics, out_dir)
    if cfg.evaluate.enabled:
        test_report(cfg, run_, estimator, metrics, out_dir)
    images = stamp_grids(run_.dm, out_dir)
    if (out_dir / "shear_scatter.png").is_file():
        images["calibration/shear_scatter"] = out_dir / "shear_scatter.png"
    log_images(run_.loggers, images, step=run_.trainer.global_step)
    metrics["epochs_completed"] = run_.trainer.current_epoch
    metrics["global_step"] = run_.trainer.global_step
    metrics["wall_time_s"] = time.time() - t0
    write_json(metrics, out_dir / "metrics.json")
    log.info("wrote %s", out_dir / "metrics.json")
    finish_loggers(run_.loggers)
    return metrics
