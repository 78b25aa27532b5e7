"""Evaluation task: CNN estimators and classical baselines on the same test stamps.

For every estimator (each CNN file with and without the 8-fold symmetry average, and the
baselines moments, rrg, ksb, regauss, fpfs, wlenet) and each shear component this measures

- m and c of g_est = (1 + m) g_true + c (``docs/CONVENTIONS.md``) with errors. With ring pairs
  (``test.ring``: every galaxy also drawn rotated by 90 degrees with the same shear) m and c come
  from the pair-averaged fit, which cancels intrinsic shape noise;
- sigma, the RMS error of the calibrated estimate (g_est - c) / (1 + m) per galaxy (unpaired
  fit), with errors from a bootstrap over ring pairs (pairs are resampled whole, since the two
  copies of a galaxy are correlated);
- the number of failures (estimator flags, non-finite outputs), shown in every table.

Studies (``studies.*.enabled``; the registry ``wlshear.tasks.studies.STUDIES``, run in this order),
each written as a CSV and a PNG:

- ``magnitude_bins``: m and sigma in bins of the stamp magnitude (per-bin calibration, and sigma
  with the global calibration as ``sigma{k}_fixed``);
- ``conditional_bins``: m, c (with errors, ring-pair fit) and sigma of every estimator in quantile bins
  of the *measured* magnitude, half-light radius and S/N (``measure_observables`` on the test
  stamps; ring pairs binned by their mean observable), ``conditional_bins.csv`` / ``.png``;
- ``shear_bins``: per component, the response m, the mean calibrated residual and sigma in bins
  of the true shear, all with the global calibration (a local slope in a bin 0.025 wide would be
  hopelessly noisy; m_bin = m + <residual> / <g_true> instead);
- ``centroid_shift``: sigma and m vs a centroid misalignment of ``s`` half-light radii in a random
  direction (same galaxies, shears, directions and noise at every ``s``);
- ``background_offset``: sigma and m vs a constant added to every pixel (units of the noise sigma);
- ``noise_levels``: sigma and m at noise_scale K, K/2, K/4 (same galaxies and shears at every
  level), with a model per level when ``studies.noise.checkpoints`` gives one, else the main
  CNN(s) at every level (recorded in the notes).
- ``metacal``: metacal-calibrated rows (``<R>^-1 g``) for every CNN and the moments baseline on the
  test set, and per-magnitude-bin m, c on real COSMOS galaxies (validation only) in the +-g
  common-noise design (``wlshear.tasks.metacal_study``), ``metacal_test.csv``, ``metacal_real.csv/png``.

In the studies ``sigma`` is recalibrated on the study set itself; ``sigma_fixed`` keeps the
calibration measured on the main test set (what a survey applying a fixed calibration would see).

Run-directory outputs: ``results.json``, ``summary.md`` (Table-4-like Markdown), ``table.csv``,
one CSV + PNG per study, ``scatter_<estimator>.png``, ``config_resolved.yaml``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from wlshear.data.datasets import CachedStampSet
from wlshear.metrics.binned import to_csv
from wlshear.metrics.plots import plot_shear_scatter
from wlshear.tasks.backend_check import backend_check
from wlshear.tasks.estimators import (
    build_baselines,
    config_mismatch,
    load_cnns,
    noise_level_checkpoints,
    resolve_checkpoints,
    run_estimators,
    summaries,
)
from wlshear.tasks.relations import RELATIONS
from wlshear.tasks.rules import EVALUATE_RULES
from wlshear.tasks.studies import STUDIES, EvalContext
from wlshear.utils.hydra import print_config_tree, save_resolved_config, write_json
from wlshear.utils.validate import validate_config

log = logging.getLogger(__name__)

__all__ = ["run", "summary_table"]


@dataclass
class _Inputs:
    """Checked inputs of a run: estimator files, per-level noise models, notes so far."""

    ckpt_paths: dict
    noise_ckpts: dict
    notes: list


def _check_inputs(cfg: DictConfig, out_dir: Path) -> _Inputs:
    """Validate the config and every named file before anything is rendered; save the config."""
    validate_config(cfg, EVALUATE_RULES, "evaluate config", RELATIONS)
    ckpt_paths = resolve_checkpoints(cfg.get("checkpoints"), cfg.get("run_dir"))
    noise_ckpts = noise_level_checkpoints((cfg.get("studies") or {}).get("noise"))  # per-level models
    if not ckpt_paths:
        log.warning("no CNN checkpoints given (run_dir / checkpoints): evaluating baselines only")
    save_resolved_config(cfg, out_dir)
    if (cfg.get("extras") or {}).get("print_config", False):
        print_config_tree(cfg, order=("data", "checkpoints", "test", "baselines", "studies", "paths"),
                          save_to=out_dir / "config_tree.txt")
    return _Inputs(ckpt_paths, noise_ckpts, [])


def _test_summaries(cfg, test, res, pair_ids, cnns, ckpt_paths, notes) -> dict:
    """Bias summaries of every estimator on the test set; a note for each CNN whose m error misses
    ``target_sigma_m`` (with the test.n that would reach it); CNN rows get their file."""
    summ = summaries(test.batch.shear.astype(np.float64), res, pair_ids, int(cfg.get("bootstrap", 0) or 0),
                     int(cfg.seed))
    target = float(cfg.get("target_sigma_m", 2e-3))
    for name, s in summ.items():
        for k in (1, 2):
            e = s[f"m{k}_err"]
            if np.isfinite(e) and e > target and s["kind"] == "cnn":
                need = int(math.ceil(len(test) * (e / target) ** 2))
                msg = (f"{name}: sigma_m{k} = {e:.4f} > target {target:g}; about test.n={need} stamps "
                       f"(ring={bool(cfg.test.ring)}) would reach it")
                log.warning(msg)
                notes.append(msg)
        log.info("%-16s m1=%+.4f±%.4f m2=%+.4f±%.4f c1=%+.5f c2=%+.5f sigma1=%.4f±%.4f sigma2=%.4f±%.4f failed=%d/%d",
                 name, s["m1"], s["m1_err"], s["m2"], s["m2_err"], s["c1"], s["c2"], s["sigma1"],
                 s["sigma1_err"], s["sigma2"], s["sigma2_err"], s["n_failed"], s["n_total"])
    for name, s in summ.items():
        base = name.rsplit("_sym", 1)[0]
        if base in cnns:
            s["checkpoint"] = str(ckpt_paths[base])
            s["symmetrized"] = name.endswith("_sym")
            s["file_calibration"] = cnns[base].calibration
    return summ


def _write_tables(ctx: EvalContext) -> dict:
    """table.csv and the scatter plots of the test set; returns the run's file list so far."""
    files = {"summary": "summary.md", "results": "results.json", "table": "table.csv"}
    to_csv([{"estimator": k, **{kk: v for kk, v in s.items() if not isinstance(v, dict)}}
            for k, s in ctx.summaries.items()], ctx.out_dir / "table.csv")
    if (ctx.cfg.get("plots") or {}).get("scatter", True):
        for name, r in ctx.results.items():
            if r.error is None and (~r.failed).sum() >= 3:
                fn = f"scatter_{name}.png"
                plot_shear_scatter(ctx.g_true, r.g, ctx.out_dir / fn, failed=r.failed,
                                   title=f"{name}: {len(r.g)} test stamps, {int(r.failed.sum())} failed")
                files[f"scatter_{name}"] = fn
    return files


def _evaluate_test_set(cfg: DictConfig, out_dir: Path, inputs: _Inputs) -> tuple[EvalContext, dict]:
    """Load the CNNs, build the data and the baselines, render (or load) the test set and run every
    estimator on it. Returns the studies' context and the skipped baselines."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    weights_only = not bool(cfg.get("trust_checkpoints", False))
    cnns = load_cnns(inputs.ckpt_paths, weights_only=weights_only)
    mismatch = {name: config_mismatch(est, data_cfg) for name, est in cnns.items()}
    for name, diffs in mismatch.items():
        for d in diffs:
            msg = f"{name} was trained on different data than this test set: {d}"
            log.warning(msg)
            inputs.notes.append(msg)
    backend = cfg.test.get("backend") or data_cfg.get("backend", "galsim")  # every set this run renders
    log.info("building data <%s>, test sets drawn by the %s backend", cfg.data._target_, backend)
    dm = instantiate(cfg.data, backend=backend)
    noise_sigma = dm.noise.sigma if dm.noise is not None else None
    baselines, skipped = build_baselines(cfg.get("baselines"), noise_sigma=noise_sigma)
    test_cfg = cfg.test
    test_seed = int(cfg.seed) * 1000 + int(test_cfg.get("seed_offset", 5))
    test = CachedStampSet(dm.eval_renderer, int(test_cfg.n), test_seed, cache_dir=dm.cache_dir, ring=bool(test_cfg.ring),
                          name=str(test_cfg.get("name", "evaltest")), progress=True,
                          max_failure_fraction=float(dm.hparams.max_failure_fraction))
    pair_ids = test.meta.get("pair_id") if test_cfg.ring else None
    check = backend_check(dm.eval_renderer, int(test_cfg.n), [test_seed, 7919], bool(test_cfg.ring),
                          int(test_cfg.get("check_n", 0) or 0), cnns, int(cfg.get("batch_size", 256)))
    log.info("test set: %d stamps (%d failed to render), ring=%s, cache %s", len(test),
             len(test.batch.failures), bool(test_cfg.ring), test.path)
    symmetrize = [bool(s) for s in cfg.get("symmetrize", [False, True])]
    res = run_estimators(test.batch.stamps, cnns, baselines, symmetrize, int(cfg.get("batch_size", 256)),
                         progress=True, desc="(test set)")
    summ = _test_summaries(cfg, test, res, pair_ids, cnns, inputs.ckpt_paths, inputs.notes)
    ctx = EvalContext(cfg=cfg, out_dir=out_dir, data_cfg=data_cfg, dm=dm, test=test, pair_ids=pair_ids, cnns=cnns,
                      ckpt_paths=inputs.ckpt_paths, baselines=baselines, results=res, summaries=summ,
                      noise_sigma=noise_sigma, test_seed=test_seed, noise_ckpts=inputs.noise_ckpts,
                      weights_only=weights_only, notes=inputs.notes)
    return ctx, {"skipped": skipped, "mismatch": mismatch, "backend": backend, "backend_check": check}


def _results(ctx: EvalContext, extra: dict, studies: dict, files: dict, t_start: float) -> dict:
    """The results.json content."""
    test_cfg, test, data_cfg = ctx.cfg.test, ctx.test, ctx.data_cfg
    for sname, s in studies.items():
        files[sname] = s["csv"]
        if s.get("png"):
            files[f"{sname}_plot"] = s["png"]
    return {
        "run_dir": str(ctx.out_dir),
        "checkpoints": {k: str(v) for k, v in ctx.ckpt_paths.items()},
        "test_set": {"n": len(test), "n_requested": int(test_cfg.n), "n_render_failed": len(test.batch.failures),
                     "ring": bool(test_cfg.ring), "seed": ctx.test_seed, "cache": str(test.path) if test.path else None,
                     "noise_scale": data_cfg.get("noise_scale"), "noise_sigma_counts": ctx.noise_sigma,
                     "population": data_cfg.get("eval_population"), "backend": extra["backend"],
                     "backend_check": extra["backend_check"],
                     "source": (data_cfg.get("source") or {}).get("_target_")},
        "estimators": ctx.summaries,
        "skipped": extra["skipped"],
        "training_data_mismatch": extra["mismatch"],
        "studies": studies,
        "notes": ctx.notes,
        "files": files,
        "wall_time_s": time.time() - t_start,
    }


def run(cfg: DictConfig) -> dict:
    """Evaluate; returns the results dict (also written to ``results.json``)."""
    t_start = time.time()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = _check_inputs(cfg, out_dir)
    ctx, extra = _evaluate_test_set(cfg, out_dir, inputs)
    files = _write_tables(ctx)
    studies_cfg = cfg.get("studies") or {}
    studies = {}
    for name, study in STUDIES.items():
        scfg = studies_cfg.get(study.config_key) or {}
        if scfg.get("enabled", False):
            studies[name] = study.run(ctx, scfg)
    results = _results(ctx, extra, studies, files, t_start)
    write_json(results, out_dir / "results.json")
    (out_dir / "summary.md").write_text(_summary_markdown(results))
    log.info("wrote %s and %s", out_dir / "results.json", out_dir / "summary.md")
    print(summary_table(ctx.summaries, extra["skipped"]))
    return results


# ---------------------------------------------------------------------------------------------
# the Markdown report


def _pm(v, e, fmt) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    s = format(v, fmt)
    if e is not None and np.isfinite(e):
        s += " ± " + format(e, fmt.lstrip("+"))
    return s


def summary_table(results: dict, skipped: dict | None = None) -> str:
    """Markdown table like the paper's Table 4: m, c (ring-pair fit), sigma (per galaxy), failures."""
    lines = ["| estimator | m1 | m2 | c1 | c2 | sigma1 | sigma2 | failures |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r.get("error"):
            lines.append(f"| {name} | crashed: {r['error']} |  |  |  |  |  | {r['n_failed']}/{r['n_total']} |")
            continue
        frac = r["n_failed"] / max(r["n_total"], 1)
        cells = [_pm(r["m1"], r["m1_err"], "+.4f"), _pm(r["m2"], r["m2_err"], "+.4f"),
                 _pm(r["c1"], r["c1_err"], "+.5f"), _pm(r["c2"], r["c2_err"], "+.5f"),
                 _pm(r["sigma1"], r["sigma1_err"], ".4f"), _pm(r["sigma2"], r["sigma2_err"], ".4f"),
                 f"{r['n_failed']}/{r['n_total']} ({100 * frac:.2f}%)"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, reason in (skipped or {}).items():
        lines.append(f"| {name} | skipped: {reason} |  |  |  |  |  |  |")
    return "\n".join(lines) + "\n"


def _summary_markdown(results: dict) -> str:
    ts = results["test_set"]
    lines = [
        "# wlshear evaluation",
        "",
        f"Test set: {ts['n']} stamps ({ts['n_render_failed']} failed to render), source {ts['source']}, "
        f"population {ts['population']}, noise_scale {ts['noise_scale']}, "
        f"{'90-degree ring pairs' if ts['ring'] else 'no ring pairs'}, seed {ts['seed']}.",
        "",
        "m, c: fit of g_est = (1 + m) g + c" + (" on ring-pair means (shape noise cancelled)" if ts["ring"] else "")
        + "; sigma: RMS error per galaxy of the calibrated estimate (g_est - c) / (1 + m); errors: "
        + ("bootstrap over ring pairs" if results["estimators"] and next(iter(results["estimators"].values())).get("bootstrap") else "analytic")
        + ". Failures are counted in the last column and excluded from the fits. "
        "CNN rows `<name>_sym` use the 8-fold symmetry average.",
        "",
        summary_table(results["estimators"], results["skipped"]),
        "Published (Springer et al. 2018, CLASH-matched COSMOS test set): moments m 0.119/0.121, sigma "
        "0.257/0.259; CNN m 0.005/0.005, sigma 0.225/0.224.",
        "",
    ]
    if results["checkpoints"]:
        lines += ["## Estimator files", ""] + [f"- `{k}`: `{v}`" for k, v in results["checkpoints"].items()] + [""]
    if results["studies"]:
        lines += ["## Studies", ""]
        for name, s in results["studies"].items():
            lines.append(f"- {name}: [{s['csv']}]({s['csv']}), ![{name}]({s['png']})")
        lines.append("")
    if results["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines.append(f"Wall time {results['wall_time_s']:.0f} s.")
    return "\n".join(lines) + "\n"
