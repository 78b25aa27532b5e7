"""train.py's checks before anything is built or rendered: unset mandatory values, typed and ranged
values (``wlshear.tasks.rules.TRAIN_RULES``), a 'matched' population without its catalogue, and a
run that could only write estimators of an untrained network."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from wlshear.tasks.relations import RELATIONS
from wlshear.tasks.rules import TRAIN_RULES
from wlshear.utils.validate import validate_config

__all__ = ["check_required", "check_will_train", "UntrainedError", "untrained_hint"]


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


def untrained_hint(why: str) -> str:
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
        raise UntrainedError(untrained_hint("train=false and no ckpt_path or model.init_from"))
    for key in ("max_epochs", "max_steps"):
        if tr.get(key) == 0:
            raise UntrainedError(untrained_hint(f"trainer.{key}=0"))
