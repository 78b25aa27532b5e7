"""CLASH field inference: CNN shears, shear maps, per-galaxy errors and relative calibration.

Per cluster, :func:`process_cluster` runs the steps of the paper's section 6 in order (each a
function of :mod:`wlshear.clash.pipeline` returning a small typed result): load the field (the n
filters combined; pixels with weight < ``io.min_weight`` or NaN in any filter are bad) -> detect
sources and match the baseline catalogue (within ``detection.match_radius_arcsec``) -> cuts (edge,
bad pixels, mean ivar, photometry, stars, unmatched) -> 32x32 stamps -> CNN shears (symmetrised) ->
calibration (the estimator's own, or ``shear_calibration=metacal``: the field's mean response) ->
the shear catalogue -> shear maps per scale with bootstrap errors (FITS, whisker PNG) -> errors
(hold-out per-galaxy sigma_source; maps of both estimators sampled at 1/10 of the source density
for the relative calibration CNN = (1 + m) baseline + c, pooled over all clusters of the run) ->
the tangential-shear profile (CSV + PNG, with the NFW model when the cluster gives its truth).

Output flag bits of the shear catalogue: the ``wlshear.clash.cuts`` bits (1 edge, 2 bad pixels,
4 low ivar, 8 star, 16 photometry, 32 unmatched) plus 64 = CNN failed (non-finite stamp/output).
``flags == 0`` rows are the galaxies used for maps, errors and profiles.

Failure policy: any exception while processing a cluster is caught, logged and recorded (type and
message) under ``clusters.<name>`` and ``failed`` in ``run_summary.json``; the remaining clusters
still run. ``infer_clash.py`` exits with ``fail_exit_code`` (default 1) if any cluster failed.
A missing/unreadable estimator or an empty cluster list is a configuration error raised at once.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from wlshear.clash import pipeline as steps
from wlshear.clash.errors import pooled_relative_calibration, pooled_sigma_source
from wlshear.models.estimator import load_estimator
from wlshear.tasks.relations import RELATIONS
from wlshear.tasks.rules import INFER_CLASH_RULES
from wlshear.utils.hydra import print_config_tree, save_resolved_config, write_json
from wlshear.utils.plain import to_plain
from wlshear.utils.validate import validate_config

log = logging.getLogger(__name__)

__all__ = ["run", "process_cluster", "check_calibrated"]


def _plain(cfg):
    return to_plain(cfg, unknown=lambda o: o)


def _cluster_list(cfg) -> list[dict]:
    clusters = _plain(cfg.get("clusters"))
    if not clusters:
        raise ValueError("infer_clash: `clusters` is empty; give a list of {name, dir, redshift, catalogue?}")
    if isinstance(clusters, dict):  # also accept a mapping name -> settings
        clusters = [{"name": k, **(v or {})} for k, v in clusters.items()]
    out, seen = [], set()
    for i, c in enumerate(clusters):
        if not isinstance(c, dict) or not c.get("name") or not c.get("dir"):
            raise ValueError(f"infer_clash: clusters[{i}] = {c!r} needs at least `name` and `dir`")
        if c["name"] in seen:
            raise ValueError(f"infer_clash: cluster name {c['name']!r} appears twice; names label the output folders")
        seen.add(c["name"])
        out.append(dict(c))
    return out


def _cut_counts(cut_summary: dict) -> str:
    return ", ".join(f"{k[2:]}={v}" for k, v in cut_summary.items() if k.startswith("n_") and not k.startswith("n_only"))


def process_cluster(c: dict, cfg, estimator, out_root: Path, rng: np.random.Generator) -> dict:
    """Run every step on one cluster; returns its summary and the sampled calibration points."""
    t0, name = time.time(), c["name"]
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    truth = steps.load_truth(c.get("truth"), c.get("redshift"))
    summary: dict = {"name": name, "dir": str(c["dir"]), "redshift": c.get("redshift"), "status": "running"}

    fld = steps.load_cluster_field(c, cfg.io)                                   # the field
    summary.update(fld.summary)
    dets = steps.detect(name, fld, cfg.detection, c.get("catalogue"),            # detection + matching
                        str(c.get("catalogue_frame") or cfg.get("catalogue_frame", "sky")))
    summary.update(n_detected=len(dets.det), baseline=dets.info)
    sel = steps.select(name, fld, dets, cfg.cuts, out)                          # cuts
    summary["cuts"] = sel.summary
    shears = steps.measure_shear(fld, dets, sel, estimator, cfg)               # stamps -> shear -> calibration
    use = shears.use
    if shears.r_mean is not None:
        summary["metacal_R_mean"] = shears.r_mean.tolist()
        log.info("[%s] metacal: <R> = %s over %d galaxies", name, np.round(shears.r_mean, 4).tolist(), int(use.sum()))
    summary["n_cnn_failed"] = int(((shears.flags & steps.FLAG_CNN_FAILED) != 0).sum())
    summary["n_galaxies"] = int(use.sum())
    f = fld.field
    summary["density_per_arcmin2"] = float(use.sum() / ((~f.bad).sum() * (f.pixel_scale / 60) ** 2))
    log.info("[%s] %d detections -> %d galaxies after cuts (%s)", name, len(dets.det), use.sum(), _cut_counts(sel.summary))
    files = {"catalogue": str(steps.write_catalogue(name, dets, shears, out / f"{name}_shear_catalogue.fits",
                                                    wcs=f.wcs))}
    if use.sum() < steps.MIN_GALAXIES:
        raise steps.ClusterError(f"only {int(use.sum())} galaxies pass the cuts in {name} (need >= 10 for maps and "
                                 f"errors); cut counts: { {k: v for k, v in sel.summary.items() if k.startswith('n_')} }")

    maps = steps.make_maps(name, fld, dets, shears, cfg.maps, out, rng, bool(cfg.get("progress", True)))
    summary["n_common"] = int(maps.common.sum())
    if maps.note:
        summary["baseline"]["comparison_note"] = maps.note
    files["maps"], files["whiskers"] = maps.files, maps.whiskers
    errors = steps.estimate_errors(fld, dets, shears, maps, cfg, rng, out=out, name=name)          # hold-out errors, calibration points
    summary["sigma_source"] = errors.holdout
    if errors.points is not None:
        summary["n_calibration_points"] = errors.n_points
        if errors.calibration is not None:
            summary["calibration"] = errors.calibration
    pairs = steps.truth_pairs(c, dets, shears)                                  # mock fields: against the truth
    if pairs is not None:
        summary["truth_bias"] = steps.truth_bias(pairs, shears.shear_max)
    prof = steps.tangential_profile(name, c, fld, dets, shears, maps, truth, cfg.profile, out)
    files.update({"profile_csv": str(prof.csv), "profile_png": str(prof.png)})
    summary.update(center_px=list(prof.center), truth=truth, files=files, status="ok", wall_time_s=time.time() - t0)
    write_json(summary, out / f"{name}_summary.json")
    return {"summary": summary, "points": errors.points, "truth_pairs": pairs}


# ----------------------------------------------------------------------------- run


def _fmt(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def _markdown(run_summary: dict) -> str:
    lines = ["# CLASH relative calibration (CNN = (1 + m) baseline + c)", ""]
    pooled = run_summary.get("calibration_pooled")
    lines += ["| clusters | points | m1 | m2 | c1 | c2 |", "|---|---|---|---|---|---|"]
    rows = []
    if pooled and "m1" in pooled:
        rows.append(("all (pooled)", pooled))
    for name, s in run_summary["clusters"].items():
        if isinstance(s.get("calibration"), dict) and "m1" in s["calibration"]:
            rows.append((name, s["calibration"]))
    for name, f in rows:
        lines.append(f"| {name} | {f.get('n_1', '-')} | {_fmt(f['m1'])} ± {_fmt(f['m1_err'])} | {_fmt(f['m2'])} ± "
                     f"{_fmt(f['m2_err'])} | {_fmt(f['c1'], 4)} ± {_fmt(f['c1_err'], 4)} | {_fmt(f['c2'], 4)} ± {_fmt(f['c2_err'], 4)} |")
    if not rows:
        lines.append("| (no baseline comparison available) | | | | | |")
    if pooled and "m1_err_clusters" in pooled:
        lines += ["", f"Errors of the pooled fit from resampling whole clusters ({pooled.get('n_clusters_1')} clusters; "
                  "the errors above treat every point as independent): "
                  f"m1 ± {_fmt(pooled['m1_err_clusters'])}, m2 ± {_fmt(pooled['m2_err_clusters'])}, "
                  f"c1 ± {_fmt(pooled['c1_err_clusters'], 4)}, c2 ± {_fmt(pooled['c2_err_clusters'], 4)}."]
    lines += ["", "Published (CLASH, 20 clusters): m1 0.048 ± 0.024, m2 0.057 ± 0.024, c1 0.000 ± 0.002, c2 0.005 ± 0.002.", ""]
    lines += ["## Per-galaxy statistical error (hold-out)", "",
              "| cluster | status | galaxies | sigma_source CNN (g1, g2) | CNN on common | baseline |",
              "|---|---|---|---|---|---|"]
    for name, s in run_summary["clusters"].items():
        if s.get("status") != "ok":
            lines.append(f"| {name} | FAILED: {s.get('error', '')[:120]} | | | | |")
            continue
        holdout = s.get("sigma_source", {})

        def pair(k):
            v = holdout.get(k)
            return "-" if not v else f"{_fmt(v['sigma_source'][0])}, {_fmt(v['sigma_source'][1])}"

        lines.append(f"| {name} | ok | {s.get('n_galaxies')} | {pair('cnn')} | {pair('cnn_common')} | {pair('baseline')} |")
    return "\n".join(lines) + "\n"


def check_calibrated(estimator, path, allow: bool = False, need_calibration: bool = True) -> None:
    """Refuse (ValueError) an estimator whose metadata says it has no fitted calibration (a
    Lightning checkpoint, train.py's estimator.pt) or an untrained network, unless ``allow``.
    ``need_calibration=False`` (metacal: the responses calibrate) checks only for training."""
    meta = estimator.metadata or {}
    why = []
    if need_calibration and meta.get("calibrated") is False:
        why.append("a Lightning checkpoint, which has no fitted calibration" if meta.get("source_checkpoint")
                   else "not calibrated (no head refit calibration: train.py's estimator.pt?)")
    if meta.get("untrained"):
        why.append("the network of a run that never trained (refit.allow_untrained)")
    if not why:
        return
    msg = f"infer_clash: estimator={path} is " + " and ".join(why)
    if allow:
        log.warning("%s; running it anyway (allow_uncalibrated=true): shears are biased", msg)
        return
    raise ValueError(msg + "; its shears would be biased. Use the run's estimator_refit.pt, or set "
                     "allow_uncalibrated=true to run it anyway.")


def _default_estimator(cfg) -> None:
    """No ``estimator`` given: use the shipped one (:data:`wlshear.models.pretrained.DEFAULT`)."""
    if cfg.get("estimator") in (None, ""):
        from wlshear.models.pretrained import DEFAULT

        log.info("infer_clash: no estimator given; using the shipped %r (wlshear/models/pretrained/%s.md; "
                 "estimator=<run_dir>/estimator_refit.pt for your own)", DEFAULT, DEFAULT)
        cfg.estimator = DEFAULT


def run(cfg: DictConfig) -> dict:
    """Process every configured cluster (module docstring); returns the run summary dict."""
    t0 = time.time()
    validate_config(cfg, INFER_CLASH_RULES, "infer_clash config", RELATIONS)
    _default_estimator(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out_dir)
    if cfg.get("extras", {}).get("print_config", False):
        print_config_tree(cfg, order=("clusters", "estimator", "maps", "cuts", "detection", "paths"),
                          save_to=out_dir / "config_tree.txt")
    clusters = _cluster_list(cfg)
    estimator = load_estimator(cfg.estimator)
    calibration = str(cfg.get("shear_calibration", "simulation"))
    if calibration not in ("simulation", "metacal"):
        raise ValueError(f"shear_calibration={calibration!r}: use 'simulation' (the estimator's own calibration) or 'metacal'")
    if calibration == "metacal" and estimator.metacal_operator is None:
        raise ValueError(f"shear_calibration=metacal needs an estimator trained with `metacal=default` (its file carries "
                         f"the metacal settings); {cfg.estimator} has none")
    log.info("estimator %s: %s", cfg.estimator, estimator)
    check_calibrated(estimator, cfg.estimator, bool(cfg.get("allow_uncalibrated", False)),
                     need_calibration=calibration != "metacal")
    rng = np.random.default_rng(int(cfg.seed))

    run_summary = {"estimator": str(cfg.estimator), "clusters": {}, "failed": {}, "out_dir": str(out_dir)}
    pooled, truth_pooled = [], []
    for c in tqdm(clusters, desc="clusters", disable=not cfg.get("progress", True) or len(clusters) < 2):
        name = c["name"]
        crng = np.random.default_rng([int(cfg.seed), sum(map(ord, name))])
        try:
            res = process_cluster(c, cfg, estimator, out_dir, crng)
        except Exception as exc:  # recorded; the other clusters still run
            msg = f"{type(exc).__name__}: {exc}"
            log.error("[%s] failed: %s", name, msg)
            log.debug("%s", traceback.format_exc())
            run_summary["clusters"][name] = {"name": name, "dir": str(c.get("dir")), "status": "failed", "error": msg}
            run_summary["failed"][name] = msg
            continue
        run_summary["clusters"][name] = res["summary"]
        if res["points"] is not None:
            pooled.append(res["points"])
        if res.get("truth_pairs") is not None:
            truth_pooled.append(res["truth_pairs"])

    if truth_pooled:  # mock fields: m, c against the truth over every cluster's matched galaxies
        run_summary["truth_bias_pooled"] = steps.truth_bias(
            {k: np.concatenate([p[k] for p in truth_pooled]) for k in ("g_true", "g_cnn", "g_base")},
            steps.trained_shear_max(estimator))
    ok_clusters = [r for r in run_summary["clusters"].values() if r.get("status") == "ok"]
    run_summary["sigma_source_pooled"] = {
        key: pooled_sigma_source([(r.get("sigma_source") or {}).get(key) for r in ok_clusters])
        for key in ("cnn", "baseline", "cnn_common", "recalibrated")}
    if pooled:  # one fit to every cluster's points; errors also from resampling whole clusters
        try:
            fits_ = pooled_relative_calibration(pooled, n_boot=int(cfg.calibration.get("n_boot_clusters", 200)),
                                                rng=rng, n_boot_points=int(cfg.calibration.n_boot))
            run_summary["calibration_pooled"] = steps.calibration_summary(fits_)
        except ValueError as exc:
            run_summary["calibration_pooled"] = {"error": str(exc)}
    else:
        run_summary["calibration_pooled"] = None
    run_summary["n_clusters"] = len(clusters)
    run_summary["n_ok"] = sum(1 for s in run_summary["clusters"].values() if s.get("status") == "ok")
    run_summary["n_failed"] = len(run_summary["failed"])
    run_summary["wall_time_s"] = time.time() - t0

    calib = {"calibration_pooled": run_summary["calibration_pooled"],
             "per_cluster": {n: s.get("calibration") for n, s in run_summary["clusters"].items()},
             "sigma_source": {n: s.get("sigma_source") for n, s in run_summary["clusters"].items()},
             "failed": run_summary["failed"]}
    write_json(calib, out_dir / "calibration.json")
    (out_dir / "calibration.md").write_text(_markdown(run_summary))
    write_json(run_summary, out_dir / "run_summary.json")
    log.info("infer_clash: %d/%d clusters ok, %d failed (%s); outputs in %s", run_summary["n_ok"], len(clusters),
             run_summary["n_failed"], ", ".join(run_summary["failed"]) or "none", out_dir)
    return run_summary
