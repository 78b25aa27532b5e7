"""Training task: fit the CNN, refit its head, evaluate on the cached test set.

Run-directory outputs:
- ``config_resolved.yaml`` and ``config_tree.txt``: the resolved config;
- ``checkpoints/``: Lightning checkpoints (best, last) and ``refit.ckpt`` (the refit model);
- ``estimator.pt`` (trained net, no refit) and ``estimator_refit.pt`` (refit + calibration):
  self-contained files for ``wlshear.load_estimator``;
- ``metrics.json``: validation MSE, refit diagnostics and m, c, sigma per component on the test set;
- ``shear_scatter.png``: estimated vs true shear on the test set;
- ``stamps_train.png`` / ``stamps_val.png``: grids of augmented training and validation stamps
  (also logged as images to TensorBoard / wandb when those loggers are configured);
- ``wandb_id.txt``: the wandb run id (with the wandb logger), so a resumed run continues it.

Resume: ``ckpt_path=<run>/checkpoints/last.ckpt`` continues the epoch counter, optimiser, LR
scheduler and training stream (new run dir; the wandb run id is read from ``<run>/wandb_id.txt``).
With ``auto_resume: true`` a job restarted in the same run dir (SLURM requeue, submitit
resubmission, fixed ``hydra.run.dir``) continues from its own ``checkpoints/last.ckpt`` (or
Lightning's ``hpc_ckpt_*.ckpt``). Only global rank 0 writes run-dir files.
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

from wlshear.metrics.bias import bias_summary, fit_bias
from wlshear.metrics.plots import plot_shear_scatter, plot_stamp_grid, read_png
from wlshear.models.estimator import ShearEstimator
from wlshear.models.refit import refit_head, refit_sample_size
from wlshear.utils.hydra import instantiate_group, print_config_tree, save_resolved_config, write_json
from wlshear.tasks.rules import RELATIONS, TRAIN_RULES
from wlshear.utils.validate import validate_config

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id.txt"
#: a refit calibration with 1 + m below this (outputs amplified > 5x) is written with a warning
MIN_RESPONSE = 0.2


def _launch_rank() -> int:
    """Global rank of this process as known before torch.distributed starts (env of srun/Lightning)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def check_required(cfg: DictConfig) -> None:
    """Stop early, naming the keys, when mandatory values (``???``) are unset, a value has the
    wrong type or range (``wlshear.tasks.rules.TRAIN_RULES``) or a 'matched' population has no
    ``data.target_catalog``."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(
            "these config values are required but unset: " + ", ".join(missing)
            + ". Pass them on the command line, e.g. `python train.py experiment=paper_clash "
            "data.target_catalog=/path/to/clash_mag_hlr.csv` (the CLASH (mag, hlr_px) table)."
        )
    validate_config(cfg, TRAIN_RULES, "train config", RELATIONS)
    data = cfg.get("data") or {}
    matched = [k for k in ("train_population", "eval_population") if data.get(k) == "matched"]
    if matched and not data.get("target_catalog"):
        raise ValueError(
            f"data.{matched[0]}=matched needs data.target_catalog: the CLASH (mag, hlr_px) table (FITS or "
            "CSV, columns `mag` at zero-point 25.4193 and `hlr_px` in 0.065\" pixels) whose population the "
            "stamps are matched to. Pass data.target_catalog=/path/to/table, or data.eval_population=natural."
        )


class UntrainedError(ValueError):
    """The run would write estimator files from a network that no optimiser step has changed."""


def _untrained_hint(why: str) -> str:
    return (f"{why}: refusing to write estimator.pt / estimator_refit.pt from an untrained network (the "
            "head refit and calibration of random weights give confident garbage, e.g. outputs x ~38). "
            "Train for at least one step (trainer.max_epochs >= 1, train=true), resume from a checkpoint "
            "(ckpt_path=...), start from trained weights (model.init_from=...), or set "
            "refit.allow_untrained=true to write them anyway (marked untrained in their metadata).")


def check_will_train(cfg: DictConfig, ckpt_path: str | None) -> None:
    """Before anything is rendered: refuse a run that cannot train (``train=false``,
    ``trainer.max_epochs=0`` or ``trainer.max_steps=0``) and has no trained weights to start from,
    unless ``refit.allow_untrained``."""
    if (cfg.get("refit") or {}).get("allow_untrained", False):
        return
    if ckpt_path or (cfg.get("model") or {}).get("init_from"):
        return
    tr = cfg.get("trainer") or {}
    if not cfg.get("train", True):
        raise UntrainedError(_untrained_hint("train=false and no ckpt_path or model.init_from"))
    for key in ("max_epochs", "max_steps"):
        if tr.get(key) == 0:
            raise UntrainedError(_untrained_hint(f"trainer.{key}=0"))


def resolve_ckpt_path(cfg: DictConfig, out_dir: Path) -> str | None:
    """Checkpoint to resume from: ``cfg.ckpt_path`` if set, else (``auto_resume``) this run dir's own.

    A job restarted in the same run dir (SLURM requeue, submitit resubmission) continues from
    Lightning's ``hpc_ckpt_*.ckpt`` (picked up by Lightning itself under SLURM) or from
    ``checkpoints/last.ckpt``.
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt:
        if ckpt not in ("last", "best", "hpc", "registry") and not Path(ckpt).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt} does not exist; pass the path of a Lightning "
                                    "checkpoint such as <run dir>/checkpoints/last.ckpt")
        return str(ckpt)
    if not cfg.get("auto_resume", False):
        return None
    if any(out_dir.glob("hpc_ckpt_*.ckpt")):
        from lightning.fabric.plugins.environments import SLURMEnvironment

        return None if SLURMEnvironment.detect() else "hpc"
    last = out_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("auto_resume: continuing from %s", last)
        return str(last)
    return None


def _run_dir_of_checkpoint(ckpt: str | None) -> Path | None:
    if not ckpt or ckpt in ("last", "best", "hpc", "registry"):
        return None
    p = Path(ckpt).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def wandb_run_id(out_dir: Path, ckpt_path: str | None, configured: str | None) -> tuple[str, bool]:
    """(run id, resuming) for the wandb logger.

    Order: an id set in the config; ``wandb_id.txt`` in this run dir (restarted job); the one next to
    the resumed checkpoint's run dir; else a new id.
    """
    if configured:
        return str(configured), True
    for d in (out_dir, _run_dir_of_checkpoint(ckpt_path)):
        if d is not None and (d / WANDB_ID_FILE).is_file():
            rid = (d / WANDB_ID_FILE).read_text().strip()
            if rid:
                log.info("wandb: continuing run %s (from %s)", rid, d / WANDB_ID_FILE)
                return rid, True
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8)), False


def build_loggers(cfg: DictConfig, out_dir: Path, ckpt_path: str | None) -> list:
    """Instantiate ``cfg.logger``; the wandb logger gets a stable run id (stored in ``wandb_id.txt``)."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if not (isinstance(conf, DictConfig) and "_target_" in conf):
            continue
        log.info("instantiating %s <%s>", name, conf._target_)
        kwargs = {}
        target = str(conf._target_)
        if target.endswith("WandbLogger"):
            rid, resuming = wandb_run_id(out_dir, ckpt_path, conf.get("id"))
            kwargs["id"] = rid
            if resuming:
                kwargs["resume"] = "allow"
            if _launch_rank() == 0:
                (out_dir / WANDB_ID_FILE).write_text(rid + "\n")
        lg = instantiate(conf, **kwargs)
        if isinstance(lg, WandbLogger):
            log.info("wandb run id %s (%s)", kwargs["id"], "offline" if lg._offline else "online")
        loggers.append(lg)
    return loggers


def log_images(loggers: list, images: dict[str, Path], step: int) -> None:
    """Send PNGs to image-capable loggers: wandb ``log_image``, TensorBoard ``add_image``."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for lg in loggers:
        for key, path in images.items():
            if not Path(path).is_file():
                continue
            try:
                if isinstance(lg, WandbLogger):
                    lg.log_image(key=key, images=[str(path)], step=step)
                elif isinstance(lg, TensorBoardLogger):
                    img = read_png(path)
                    lg.experiment.add_image(key, img, global_step=step, dataformats="HWC")
                    lg.experiment.flush()
            except Exception as exc:  # never lose a finished run over an image upload
                log.warning("could not log image %s to %s: %s", key, type(lg).__name__, exc)


def _stamp_grids(dm, out_dir: Path, n: int = 16) -> dict[str, Path]:
    """PNG grids of the first training (augmented) and validation stamps with their shears."""
    from itertools import islice

    out = {}
    try:
        items = list(islice(iter(dm.train_set), n)) if dm.train_set is not None else []
        if items:
            xs = np.stack([x.numpy() for x, *_ in items])
            titles = [f"{y[0]:+.2f},{y[1]:+.2f}" for _, y, *_ in items]
            out["stamps/train"] = plot_stamp_grid(xs, out_dir / "stamps_train.png", titles=titles)
        val = dm.val_set
        if val is not None and len(val):
            k = min(n, len(val))
            titles = [f"{g[0]:+.2f},{g[1]:+.2f}" for g in val.batch.shear[:k]]
            out["stamps/val"] = plot_stamp_grid(np.asarray(val.stamps[:k]), out_dir / "stamps_val.png",
                                                titles=titles)
    except Exception as exc:
        log.warning("stamp grids not written: %s", exc)
    return out


def finish_loggers(loggers: list) -> None:
    """Close experiment runs so the next job of an in-process multirun starts a new one."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        try:
            lg.finalize("success")
            if isinstance(lg, WandbLogger) and lg._experiment is not None:
                lg._experiment.finish()
        except Exception as exc:
            log.warning("closing logger %s: %s", type(lg).__name__, exc)


def _predict(estimator: ShearEstimator, stamps: torch.Tensor, symmetrize: bool) -> np.ndarray:
    return estimator.predict(stamps, symmetrize=symmetrize, batch_size=256)


def evaluate_estimator(estimator: ShearEstimator, test_set, symmetrize: bool = True) -> dict:
    """m, c (ring-pair averaged when the set has pairs) and per-galaxy sigma on a cached set."""
    g_true = test_set.batch.shear.astype(np.float64)
    g_est = _predict(estimator, test_set.stamps, symmetrize)
    out = bias_summary(g_true, g_est, pair_ids=test_set.meta.get("pair_id"))
    if out["paired"]:
        out["bias_from_ring_pairs"] = True
    return out, g_est


def _counterfactual_batches(loader, op, seed: int):
    """``(x, y, ...)`` batches of ``loader`` with ``x`` mapped to its no-shear metacal counterfactual."""
    gen = torch.Generator().manual_seed(seed)

    class _Batches:
        def __len__(self):
            return len(loader)

        def __iter__(self):
            for batch in loader:
                x = torch.as_tensor(batch[0]).float()
                noise = op.sample_noise(len(x), "cpu", torch.float32, gen) if op.adds_noise else None
                yield (op.counterfactuals(x, ("noshear",), noise=noise)[:, 0], *batch[1:])

    return _Batches()


def evaluate_metacal(estimator: ShearEstimator, test_set, symmetrize: bool = True) -> dict:
    """m, c and sigma of the metacal-calibrated shear ``<R>^-1 g`` on a cached set (ring pairs
    averaged when present); ``R_mean`` is the ensemble response."""
    from wlshear.calibration.metacal import ensemble_response

    res = estimator.metacal(test_set.stamps, symmetrize=symmetrize)
    r_mean = ensemble_response(res["R"])
    g_cal = res["g"] @ np.linalg.inv(r_mean).T
    out = bias_summary(test_set.batch.shear.astype(np.float64), g_cal, pair_ids=test_set.meta.get("pair_id"))
    out["R_mean"] = r_mean.tolist()
    return out


def run(cfg: DictConfig) -> dict:
    """Train, refit, evaluate. Returns the metrics dict (also written to metrics.json)."""
    t0 = time.time()
    check_required(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank0 = _launch_rank() == 0
    if rank0:
        save_resolved_config(cfg, out_dir)
        if cfg.get("extras", {}).get("print_config", False):
            print_config_tree(cfg, save_to=out_dir / "config_tree.txt")
    ckpt_path = resolve_ckpt_path(cfg, out_dir)
    check_will_train(cfg, ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("medium")

    log.info("building data <%s>", cfg.data._target_)
    dm = instantiate(cfg.data)
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

    metrics: dict = {"run_dir": str(out_dir)}
    initial = [p.detach().clone() for p in model.parameters()]  # to tell whether training changed anything
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=dm, ckpt_path=ckpt_path)
        metrics["resumed_from"] = ckpt_path
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    if best:
        log.info("loading best checkpoint %s", best)
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state)
        metrics["best_checkpoint"] = best
    if not trainer.is_global_zero:  # ranks > 0 stop here: only rank 0 evaluates and writes files
        return metrics
    # weights, not trainer.global_step: under ddp_spawn the main process's counters stay at 0
    unchanged = all(torch.equal(a, b.detach().cpu()) for a, b in zip(initial, model.parameters()))
    untrained = unchanged and not (cfg.get("model") or {}).get("init_from")
    del initial
    if untrained:
        if not cfg.refit.get("allow_untrained", False):
            raise UntrainedError(_untrained_hint(
                f"no optimiser step changed the network's weights (trainer.global_step = {trainer.global_step} "
                f"after trainer.max_epochs = {cfg.trainer.get('max_epochs')})"))
        log.warning("refit.allow_untrained: writing estimators of an untrained network (marked untrained)")

    dm.setup("validate")
    model.eval()
    val = dm.val_set
    with torch.no_grad():
        val_pred = ShearEstimator(model.net).predict(val.stamps, symmetrize=False)
    usable = np.isfinite(val_pred).all(axis=1)  # flagged stamps (e.g. fully masked) are NaN rows
    if not usable.all():
        metrics["val_flagged"] = int((~usable).sum())
    val_mse = float(np.mean((val_pred[usable] - val.batch.shear[usable]) ** 2))
    metrics["val_mse"] = val_mse
    metrics["val_mse_prior"] = float(cfg.data.augment.shear_max**2 / 3)
    log.info("validation MSE %.5f (prior variance %.5f)", val_mse, metrics["val_mse_prior"])
    meta = {"config": hp, "val_mse": val_mse, "untrained": bool(untrained), "calibrated": False}
    mc = dict(metacal=metacal_op, counterfactual_input=metacal_op is not None)
    ShearEstimator(model.net, metadata=meta, **mc).save(out_dir / "estimator.pt")

    estimator = ShearEstimator(model.net, metadata=meta, **mc)
    if cfg.refit.enabled:
        refit = dm.refit_set(refit_n)
        loader = torch.utils.data.DataLoader(refit, batch_size=cfg.refit.batch_size, shuffle=False)
        if metacal_op is not None:
            loader = _counterfactual_batches(loader, metacal_op, seed=int(cfg.seed))
        new_net, diag = refit_head(model.net, loader, shear_max=cfg.data.augment.shear_max, progress=True)
        metrics["refit"] = {k: v for k, v in diag.items() if np.ndim(v) == 0 or k in ("L", "m")}
        # final linear calibration of the symmetrised refit estimator, fitted on the refit set
        # (never on the test set)
        est = ShearEstimator(new_net, metadata=meta, **mc)
        cal = fit_bias(refit.batch.shear, est.predict(refit.stamps, symmetrize=cfg.evaluate.symmetrize))
        try:
            est.set_calibration(m1=cal.m[0], c1=cal.c[0], m2=cal.m[1], c2=cal.c[1])
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
        est.metadata["calibration_fit"] = cal.as_dict()
        est.metadata["refit"] = metrics["refit"]
        est.save(out_dir / "estimator_refit.pt")
        ckpt = {"state_dict": {f"net.{k}": v for k, v in new_net.state_dict().items()},
                "hyper_parameters": dict(model.hparams),
                "refit": {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in metrics["refit"].items()}}
        (out_dir / "checkpoints").mkdir(exist_ok=True)
        torch.save(ckpt, out_dir / "checkpoints" / "refit.ckpt")
        estimator = est
        metrics["calibration"] = est.calibration

    if cfg.evaluate.enabled:
        dm.setup("test")
        test = dm.test_set
        results = {}
        raw = ShearEstimator(model.net, **mc)
        results["cnn"], _ = evaluate_estimator(raw, test, symmetrize=False)
        results["cnn_sym"], _ = evaluate_estimator(raw, test, symmetrize=True)
        if cfg.refit.enabled:
            results["cnn_refit_sym"], g_est = evaluate_estimator(estimator, test, symmetrize=cfg.evaluate.symmetrize)
        else:
            g_est = _predict(raw, test.stamps, True)
        if metacal_op is not None:
            results["cnn_metacal"] = evaluate_metacal(estimator, test, symmetrize=cfg.evaluate.symmetrize)
        metrics["test"] = results
        best_key = "cnn_refit_sym" if cfg.refit.enabled else "cnn_sym"
        metrics["summary"] = {k: results[best_key][k] for k in ("m1", "m2", "c1", "c2", "sigma1", "sigma2")}
        plot_shear_scatter(test.batch.shear, g_est, out_dir / "shear_scatter.png",
                           title=f"{best_key} on {len(test)} test stamps")
        for name, r in results.items():
            log.info("%-14s m1=%+.3f+-%.3f m2=%+.3f+-%.3f c1=%+.4f c2=%+.4f sigma1=%.4f sigma2=%.4f", name,
                     r["m1"], r["m1_err"], r["m2"], r["m2_err"], r["c1"], r["c2"], r["sigma1"], r["sigma2"])
    images = _stamp_grids(dm, out_dir)
    if (out_dir / "shear_scatter.png").is_file():
        images["calibration/shear_scatter"] = out_dir / "shear_scatter.png"
    log_images(loggers, images, step=trainer.global_step)
    metrics["epochs_completed"] = trainer.current_epoch
    metrics["global_step"] = trainer.global_step
    metrics["wall_time_s"] = time.time() - t0
    write_json(metrics, out_dir / "metrics.json")
    log.info("wrote %s", out_dir / "metrics.json")
    finish_loggers(loggers)
    return metrics
