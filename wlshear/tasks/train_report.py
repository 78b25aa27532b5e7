"""End-of-training evaluation on the run's cached test set (what ``train.py`` reports).

Rows of ``metrics.json["test"]``: the raw network with and without the 8-fold symmetry average,
the refit estimator, with ``metacal=...`` its metacal-calibrated shear, and the configured
classical baselines (``baselines=[moments,fpfs]`` by default, the registry evaluate.py uses) on
the same stamps, so that the first run shows the CNN's m, c, sigma beside theirs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from wlshear.metrics.bias import bias_summary
from wlshear.metrics.plots import plot_shear_scatter
from wlshear.models.estimator import ShearEstimator
from wlshear.tasks.estimators import build_baselines, run_estimators, summaries

log = logging.getLogger(__name__)


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


def test_report(cfg: DictConfig, run: Any, estimator: ShearEstimator, metrics: dict, out_dir: Path) -> None:
    """m, c, sigma on the cached test set of the raw net (with and without the symmetry average),
    the refit estimator and, with metacal, its metacal-calibrated shears; the scatter plot."""
    run.dm.setup("test")
    test = run.dm.test_set
    results = {}
    raw = ShearEstimator(run.model.net, **run.estimator_kwargs)
    results["cnn"], _ = evaluate_estimator(raw, test, symmetrize=False)
    results["cnn_sym"], _ = evaluate_estimator(raw, test, symmetrize=True)
    if cfg.refit.enabled:
        results["cnn_refit_sym"], g_est = evaluate_estimator(estimator, test, symmetrize=cfg.evaluate.symmetrize)
    else:
        g_est = _predict(raw, test.stamps, True)
    if run.metacal_op is not None:
        results["cnn_metacal"] = evaluate_metacal(estimator, test, symmetrize=cfg.evaluate.symmetrize)
    base, skipped = _baseline_rows(cfg, run, test)
    results.update(base)
    if skipped:
        metrics["baselines_skipped"] = skipped
    metrics["test"] = results
    best_key = "cnn_refit_sym" if cfg.refit.enabled else "cnn_sym"
    keys = ("m1", "m2", "c1", "c2", "sigma1", "sigma2")
    metrics["summary"] = {k: results[best_key][k] for k in keys}
    # the method's claim on the first run: the CNN's m, c, sigma beside the classical estimators'
    metrics["summary"]["baselines"] = {n: {k: r[k] for k in (*keys, "n_failed")} for n, r in base.items()}
    plot_shear_scatter(test.batch.shear, g_est, out_dir / "shear_scatter.png",
                       title=f"{best_key} on {len(test)} test stamps")
    for name, r in results.items():
        log.info("%-14s m1=%+.3f+-%.3f m2=%+.3f+-%.3f c1=%+.4f c2=%+.4f sigma1=%.4f sigma2=%.4f", name,
                 r["m1"], r["m1_err"], r["m2"], r["m2_err"], r["c1"], r["c2"], r["sigma1"], r["sigma2"])


def _baseline_rows(cfg: DictConfig, run: Any, test) -> dict:
    """m, c, sigma of the configured classical baselines (``baselines=[moments,fpfs]``, the same
    registry as evaluate.py) on the CNN's test stamps; one that cannot be built (e.g. FPFS without
    anacal) is logged and recorded under ``metrics.json["baselines_skipped"]``."""
    specs = cfg.get("baselines")
    if not specs or not cfg.evaluate.get("baselines", True):
        return {}, {}
    noise_sigma = run.dm.noise.sigma if getattr(run.dm, "noise", None) is not None else None
    baselines, skipped = build_baselines(specs, noise_sigma=noise_sigma)
    res = run_estimators(test.stamps, {}, baselines, progress=False)
    return summaries(test.batch.shear.astype(np.float64), res, test.meta.get("pair_id"),
                     int(cfg.evaluate.get("bootstrap", 0)), int(cfg.seed)), skipped
