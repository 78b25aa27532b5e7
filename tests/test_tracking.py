"""Tracking and resume: wandb offline run dir + run id file, images to TensorBoard/wandb, and a run
interrupted after 2 epochs and resumed to 3 from last.ckpt (epoch, step, optimiser, LR scheduler,
training stream and wandb run continue)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from test_sweeps import TINY, run_train


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_continues_training_scheduler_and_wandb_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*TINY, "logger=many", "refit.enabled=false", "evaluate.enabled=false"]
    run_train([*common, "trainer.max_epochs=2", f"hydra.run.dir={a}", "extras.print_config=true"], tmp_path)
    steps_per_epoch = 32 // 16

    # wandb: offline run directory, id recorded; images logged
    rid = (a / "wandb_id.txt").read_text().strip()
    runs = list((a / "wandb").glob(f"offline-run-*-{rid}"))
    assert len(runs) == 1
    media = {p.parent.name for p in runs[0].rglob("*.png")}
    assert {"stamps"} <= media
    # TensorBoard got the stamp grids as images; config tree printed and saved
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for ev in (a / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        tags |= set(acc.Tags()["images"])
    assert {"stamps/train", "stamps/val"} <= tags
    assert "CONFIG" in (a / "config_tree.txt").read_text()

    ca = _ckpt(a / "checkpoints" / "last.ckpt")
    assert (ca["epoch"], ca["global_step"]) == (1, 2 * steps_per_epoch)
    sched_a = ca["lr_schedulers"][0]
    assert sched_a["last_epoch"] >= 1 and sched_a["best"] < float("inf")  # stepped after epoch 0

    run_train([*common, "trainer.max_epochs=3", f"ckpt_path={a}/checkpoints/last.ckpt", f"hydra.run.dir={b}"],
              tmp_path)
    cb = _ckpt(b / "checkpoints" / "last.ckpt")
    assert (cb["epoch"], cb["global_step"]) == (2, 3 * steps_per_epoch)  # continued, not restarted
    # optimiser state restored: RMSprop's per-parameter step count runs on from run a
    assert float(cb["optimizer_states"][0]["state"][0]["step"]) == 3 * steps_per_epoch
    # LR scheduler restored (a fresh ReduceLROnPlateau would hold best = inf here)
    assert cb["lr_schedulers"][0]["best"] <= sched_a["best"]
    assert cb["lr_schedulers"][0]["last_epoch"] >= sched_a["last_epoch"]
    # the training stream continued with epoch 2's stamps
    assert cb["ShearDataModule"]["train_passes"] == 3
    # only epoch 2 was trained in run b
    rows = list(csv.DictReader(open(next((b / "csv").rglob("metrics.csv")))))
    assert {r["epoch"] for r in rows if r.get("train/loss_epoch")} == {"2"}
    m = json.loads((b / "metrics.json").read_text())
    assert m["resumed_from"] == f"{a}/checkpoints/last.ckpt" and m["global_step"] == 3 * steps_per_epoch
    # same wandb run continued
    assert (b / "wandb_id.txt").read_text().strip() == rid
    assert list((b / "wandb").glob(f"offline-run-*-{rid}"))


def test_resolve_ckpt_path_auto_resume(tmp_path):
    from omegaconf import OmegaConf

    from wlshear.tasks.tracking import resolve_ckpt_path

    cfg = OmegaConf.create({"ckpt_path": None, "auto_resume": True})
    assert resolve_ckpt_path(cfg, tmp_path) is None  # fresh run dir
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path(cfg, tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    cfg.auto_resume = False
    assert resolve_ckpt_path(cfg, tmp_path) is None
    cfg.ckpt_path = str(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt_path(cfg, tmp_path)


def test_wandb_id_lookup_order(tmp_path):
    from wlshear.tasks.tracking import wandb_run_id

    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "wandb_id.txt").write_text("abc123\n")
    new = tmp_path / "new"
    new.mkdir()
    assert wandb_run_id(new, str(old / "checkpoints" / "last.ckpt"), None) == ("abc123", True)
    assert wandb_run_id(new, None, "forced") == ("forced", True)
    rid, resuming = wandb_run_id(new, None, None)
    assert len(rid) == 8 and not resuming
