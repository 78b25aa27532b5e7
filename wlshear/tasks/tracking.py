"""train.py's run bookkeeping: resuming from checkpoints, experiment loggers (a stable wandb run
id across restarts) and images sent to the loggers.

Resume: ``ckpt_path=<run>/checkpoints/last.ckpt`` continues the epoch counter, optimiser, LR
scheduler and training stream (new run dir; the wandb run id is read from ``<run>/wandb_id.txt``).
With ``auto_resume: true`` a job restarted in the same run dir (SLURM requeue, submitit
resubmission, fixed ``hydra.run.dir``) continues from its own ``checkpoints/last.ckpt`` (or
Lightning's ``hpc_ckpt_*.ckpt``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from wlshear.metrics.plots import plot_stamp_grid, read_png

log = logging.getLogger(__name__)

__all__ = ["WANDB_ID_FILE", "launch_rank", "resolve_ckpt_path", "wandb_run_id", "build_loggers", "log_images",
           "stamp_grids", "finish_loggers"]

WANDB_ID_FILE = "wandb_id.txt"


def launch_rank() -> int:
    """Global rank of this process as known before torch.distributed starts (env of srun/Lightning)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


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
            if launch_rank() == 0:
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


def stamp_grids(dm, out_dir: Path, n: int = 16) -> dict[str, Path]:
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
