"""evaluate.py's studies: a registry of named studies, each ``study(context, config) -> record``.

:data:`STUDIES` maps the results name of a study to its config key (``studies.<key>`` in
``conf/evaluate.yaml``) and function; ``wlshear.tasks.evaluate.run`` runs the enabled ones in this
order. A study reads the main test set and the estimators' results on it from an
:class:`EvalContext`, may render more sets (through ``CachedStampSet``), writes one CSV and one PNG
into the run directory and returns its record for results.json (``csv``, ``png``, ``rows``, ...);
its statistics are in :mod:`wlshear.metrics.studies` / :mod:`wlshear.metrics.conditional`, its plot
in :mod:`wlshear.metrics.plots`. In the studies ``sigma`` is recalibrated on the study set itself;
``sigma_fixed`` keeps the calibration measured on the main test set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from wlshear.data.datasets import CachedStampSet
from wlshear.metrics.binned import bin_edges, to_csv
from wlshear.metrics.conditional import conditional_rows
from wlshear.metrics.plots import plot_conditional, plot_shear_bins, plot_study
from wlshear.metrics.studies import calibration, magnitude_bin_rows, shear_bin_rows, summary_rows
from wlshear.models.estimator import load_estimator
from wlshear.observables import measure_observables
from wlshear.sim.noise import CorrelatedNoise
from wlshear.tasks.estimators import EstimateResult, build_baselines, cnn_rows, noise_dependent, run_estimators
from wlshear.tasks.metacal_study import metacal_study, study_margin

log = logging.getLogger(__name__)

__all__ = ["EvalContext", "Study", "STUDIES"]


@dataclass
class EvalContext:
    """What the studies read: the evaluate config, the data module and main test set, every
    estimator and its results on that set. Studies append to ``notes``."""

    cfg: DictConfig
    out_dir: Path
    data_cfg: dict
    dm: Any                              # the ShearDataModule (evaluation renderer, noise kernel, cache)
    test: CachedStampSet
    pair_ids: np.ndarray | None
    cnns: dict
    ckpt_paths: dict
    baselines: dict
    results: dict[str, EstimateResult]  # every estimator on the test set
    summaries: dict                      # their bias summaries (the test-set calibrations)
    noise_sigma: float | None
    test_seed: int
    noise_ckpts: dict
    weights_only: bool
    notes: list
    progress: bool = True

    @property
    def renderer(self):
        return self.dm.eval_renderer

    @property
    def stamps(self) -> np.ndarray:
        return self.test.batch.stamps

    @property
    def g_true(self) -> np.ndarray:
        return self.test.batch.shear.astype(np.float64)

    @property
    def ring(self) -> bool:
        return bool(self.cfg.test.ring)

    @property
    def studies_cfg(self):
        return self.cfg.get("studies") or {}

    @property
    def study_sym(self) -> list[bool]:
        return [bool(s) for s in self.studies_cfg.get("cnn_symmetrize", [True])]

    @property
    def study_baselines(self) -> dict:
        return {n: self.baselines[n] for n in (self.studies_cfg.get("baselines") or []) if n in self.baselines}

    @property
    def study_results(self) -> dict[str, EstimateResult]:
        """The test-set results of the rows that enter the studies (``studies.cnn_symmetrize``,
        ``studies.baselines``)."""
        rows = {row for row, _, _ in cnn_rows(self.cnns, self.study_sym)}
        return {n: r for n, r in self.results.items()
                if (r.kind == "cnn" and n in rows) or (r.kind == "baseline" and n in self.study_baselines)}

    def cal_of(self, name: str) -> dict | None:
        """The test-set calibration of estimator row ``name`` (None for rows not on the test set)."""
        return calibration(self.summaries[name]) if name in self.summaries else None

    def cached_set(self, renderer, n: int, seed: int, name: str, **kw) -> CachedStampSet:
        return CachedStampSet(renderer, n, seed, cache_dir=self.dm.cache_dir, ring=self.ring, name=name,
                              progress=self.progress, max_failure_fraction=float(self.dm.hparams.max_failure_fraction),
                              **kw)

    def run(self, stamps, cnns: dict, baselines: dict, desc: str) -> dict[str, EstimateResult]:
        return run_estimators(stamps, cnns, baselines, self.study_sym, int(self.cfg.get("batch_size", 256)),
                              progress=self.progress, desc=desc)


def _estimates(results: dict[str, EstimateResult]) -> dict:
    return {n: (r.g, r.failed) for n, r in results.items()}


def _record(ctx: EvalContext, name: str, rows: list[dict], **extra) -> dict:
    """Write ``<name>.csv`` and return the study's record (its plot is ``<name>.png``)."""
    to_csv(rows, ctx.out_dir / f"{name}.csv")
    return {"csv": f"{name}.csv", "png": f"{name}.png", **extra, "rows": rows}


def magnitude_bins(ctx: EvalContext, scfg) -> dict:
    """m and sigma in bins of a stamp meta column (per-bin calibration; ``sigma_fixed`` global)."""
    key = str(scfg.get("key", "mag"))
    if key not in ctx.test.meta:
        raise ValueError(f"studies.magnitude.key={key!r} is not a stamp meta column; use one of {sorted(ctx.test.meta)}")
    bins = scfg.get("bins", 5)
    bins = list(bins) if not isinstance(bins, (int, float)) else int(bins)
    x = np.asarray(ctx.test.meta[key], dtype=np.float64)
    edges = bin_edges(x, bins)
    rows = magnitude_bin_rows(x, ctx.g_true, _estimates(ctx.study_results), edges, key, ctx.cal_of)
    record = _record(ctx, "magnitude_bins", rows, edges=edges.tolist(), key=key)
    plot_study(rows, f"{key}_mean", ctx.out_dir / "magnitude_bins.png", xlabel=f"{key} (bin mean)",
               stats=("sigma", "sigma_fixed", "m"))
    return record


def conditional_bins(ctx: EvalContext, scfg) -> dict:
    """m, c and sigma in quantile bins of the observables measured on the test stamps."""
    obs = measure_observables(ctx.stamps)
    bins = scfg.get("bins") or {"mag": 5, "hlr_px": 3, "snr": 3}
    bins = OmegaConf.to_container(bins, resolve=True) if isinstance(bins, DictConfig) else dict(bins)
    chosen = ctx.results if scfg.get("all_estimators", True) else ctx.study_results
    rows = conditional_rows(ctx.g_true, _estimates(chosen), obs, ctx.pair_ids, bins, {n: ctx.cal_of(n) for n in chosen})
    observables = "measure_observables on the test stamps" + (" (pair means)" if ctx.pair_ids is not None else "")
    record = _record(ctx, "conditional_bins", rows, bins=bins, observables=observables)
    plot_conditional(rows, ctx.out_dir / "conditional_bins.png")
    return record


def shear_bins(ctx: EvalContext, scfg) -> dict:
    """Response, mean calibrated residual and sigma per bin of the true shear (global calibration)."""
    lo, hi = (float(v) for v in scfg.get("range", [-0.2, 0.2]))
    edges = np.linspace(lo, hi, int(scfg.get("bins", 16)) + 1)
    rows = []
    for name, r in ctx.study_results.items():
        rows += shear_bin_rows(ctx.g_true, r.g, r.failed, ctx.pair_ids, ctx.cal_of(name), edges, name)
    record = _record(ctx, "shear_bins", rows, edges=edges.tolist())
    plot_shear_bins(rows, ctx.out_dir / "shear_bins.png")
    return record


def centroid_shift(ctx: EvalContext, scfg) -> dict:
    """sigma and m vs a centroid misalignment of up to s half-light radii (``distribution``:
    ``uniform`` per axis over a total extent s hlr, the paper's; or ``direction``, length s hlr in a
    random direction); the same galaxies, shears, shift draws and noise at every s."""
    rows = []
    dist = str(scfg.get("distribution", "uniform"))
    for shift in [float(s) for s in scfg.get("shifts_hlr", [0, 0.2, 0.4, 0.6, 0.8])]:
        shifted = ctx.cached_set(ctx.renderer, int(scfg.get("n", 4000)), ctx.test_seed + 17, "centroid",
                                 centroid_shift_hlr=shift, centroid_distribution=dist).batch
        log.info("centroid shift %.2f hlr: %d stamps (%d failed to render)", shift, len(shifted), len(shifted.failures))
        res = ctx.run(shifted.stamps, ctx.cnns, ctx.study_baselines, desc=f"(shift {shift:g} hlr)")
        rows += summary_rows(shifted.shear.astype(np.float64), _estimates(res),
                             shifted.meta["pair_id"] if ctx.ring else None, ctx.cal_of,
                             {"shift_hlr": shift, "distribution": dist, "n_render_failed": len(shifted.failures)})
    record = _record(ctx, "centroid_shift", rows)
    plot_study(rows, "shift_hlr", ctx.out_dir / "centroid_shift.png", "centroid shift [half-light radii]")
    return record


def background_offset(ctx: EvalContext, scfg) -> dict:
    """sigma and m vs a constant added to every pixel (units of the noise sigma)."""
    if ctx.noise_sigma is None:
        unit = CorrelatedNoise(ctx.dm.hparams.noise_kernel, 1.0).sigma
        ctx.notes.append(f"background offsets: the test set is noiseless; offsets are in units of the "
                         f"full-level kernel's sigma {unit:.3g} counts")
    else:
        unit = ctx.noise_sigma
    n = scfg.get("n")
    n = len(ctx.test) if n is None else min(int(n), len(ctx.test))
    pairs = ctx.pair_ids[:n] if ctx.pair_ids is not None else None
    rows = []
    for off in [float(o) for o in scfg.get("offsets_sigma", [0, 0.5, 1, 2])]:
        res = ctx.run(ctx.stamps[:n] + np.float32(off * unit), ctx.cnns, ctx.study_baselines,
                      desc=f"(offset {off:g} sigma)")
        rows += summary_rows(ctx.g_true[:n], _estimates(res), pairs, ctx.cal_of,
                             {"offset_sigma": off, "offset_counts": off * unit})
    record = _record(ctx, "background_offset", rows, noise_sigma_counts=unit)
    plot_study(rows, "offset_sigma", ctx.out_dir / "background_offset.png", "constant background [noise sigma]")
    return record


def _release_level(lvl: float) -> str:
    """The noise level as the baselines' ``noise_level`` string: one of the authors' released
    models' levels, else full noise."""
    return f"{lvl:.3f}" if f"{lvl:.3f}" in ("1.000", "0.500", "0.250") else "1.000"


def noise_levels(ctx: EvalContext, scfg) -> dict:
    """sigma and m at noise_scale K, K/2, K/4 (same galaxies and shears at every level), with a
    model per level when ``studies.noise.checkpoints`` gives one, else the main CNN(s)."""
    if not ctx.noise_ckpts:
        msg = (f"noise study: no per-level models (studies.noise.checkpoints); the same CNN(s) "
               f"{list(ctx.cnns)} are evaluated at every noise level (trained at data.noise_scale="
               f"{ctx.data_cfg.get('noise_scale')} unless their metadata says otherwise)")
        log.info(msg)
        ctx.notes.append(msg)
    rebuilt = [n for n in ctx.study_baselines if n in noise_dependent(ctx.cfg.get("baselines"))]
    fixed = {n: b for n, b in ctx.study_baselines.items() if n not in rebuilt}
    rows = []
    for lvl in [float(v) for v in scfg.get("levels", [1.0, 0.5, 0.25])]:
        renderer = ctx.renderer.with_noise(CorrelatedNoise(ctx.dm.hparams.noise_kernel, lvl) if lvl > 0 else None)
        level_set = ctx.cached_set(renderer, int(scfg.get("n", 4000)), ctx.test_seed + 31, f"evalnoise{lvl:g}")
        sigma = renderer.noise.sigma if renderer.noise is not None else None
        level_bl, level_skip = build_baselines(ctx.cfg.get("baselines"), noise_sigma=sigma if sigma else 1e-6,
                                               noise_level=_release_level(lvl), names=rebuilt)
        for bname, reason in level_skip.items():
            ctx.notes.append(f"noise level {lvl:g}: {bname} skipped: {reason}")
        models = dict(ctx.cnns)
        if lvl in ctx.noise_ckpts:
            models["cnn_matched"] = load_estimator(ctx.noise_ckpts[lvl], weights_only=ctx.weights_only)
        res = ctx.run(level_set.batch.stamps, models, {**fixed, **level_bl}, desc=f"(noise {lvl:g} K)")
        level_rows = summary_rows(level_set.batch.shear.astype(np.float64), _estimates(res),
                                  level_set.meta["pair_id"] if ctx.ring else None,
                                  lambda name: ctx.cal_of(name) if not name.startswith("cnn_matched") else None,
                                  {"noise_scale": lvl, "noise_sigma_counts": sigma or 0.0})
        for row in level_rows:  # which file made each CNN row at this level
            base = row["estimator"].rsplit("_sym", 1)[0]
            row["checkpoint"] = (str(ctx.noise_ckpts[lvl]) if base == "cnn_matched"
                                 else str(ctx.ckpt_paths[base]) if base in ctx.ckpt_paths else "")
        rows += level_rows
    record = _record(ctx, "noise_levels", rows,
                     per_level_models={str(k): str(v) for k, v in ctx.noise_ckpts.items()})
    plot_study(rows, "noise_scale", ctx.out_dir / "noise_levels.png", "noise level [x K_bg]")
    return record


def metacal(ctx: EvalContext, scfg) -> dict:
    """Metacal-calibrated rows on the test set and per-magnitude m, c on real galaxies
    (:mod:`wlshear.tasks.metacal_study`)."""
    scfg = OmegaConf.to_container(scfg, resolve=True) if isinstance(scfg, DictConfig) else dict(scfg)
    n = scfg.get("n")
    margin = study_margin(scfg, ctx.cnns)
    renderer, stamps, g_true, pair_ids = ctx.renderer, ctx.stamps, ctx.g_true, ctx.pair_ids
    if margin > 0:  # the same test set (seed), drawn with the operator's margin
        renderer = renderer.with_stamp_size(renderer.stamp_size + 2 * margin)
        wide = ctx.cached_set(renderer, len(ctx.test) if n is None else int(n), ctx.test_seed, "metacal_test")
        stamps, g_true = wide.batch.stamps, wide.batch.shear.astype(np.float64)
        pair_ids = wide.meta.get("pair_id") if ctx.ring else None
    sel = np.ones(len(stamps), bool) if n is None else (
        pair_ids < int(n) // 2 if pair_ids is not None else np.arange(len(stamps)) < int(n))
    study, notes = metacal_study(scfg, stamps=stamps[sel], g_true=g_true[sel],
                                 pair_ids=pair_ids[sel] if pair_ids is not None else None, cnns=ctx.cnns,
                                 baselines=ctx.baselines, renderer=renderer, data_cfg=ctx.data_cfg,
                                 out_dir=ctx.out_dir, seed=int(ctx.cfg.seed))
    ctx.notes += notes
    return study


@dataclass(frozen=True)
class Study:
    """A named study: its config key (``studies.<config_key>``) and ``run(context, config) -> record``."""

    config_key: str
    run: Callable[[EvalContext, Any], dict]


#: results name -> study, in the order evaluate.py runs them
STUDIES: dict[str, Study] = {
    "magnitude_bins": Study("magnitude", magnitude_bins),
    "conditional_bins": Study("conditional", conditional_bins),
    "shear_bins": Study("shear", shear_bins),
    "centroid_shift": Study("centroid", centroid_shift),
    "background_offset": Study("background", background_offset),
    "noise_levels": Study("noise", noise_levels),
    "metacal": Study("metacal", metacal),
}
