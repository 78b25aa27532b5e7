"""evaluate.py's metacalibration study: metacal rows beside the simulation-calibrated ones.

Two parts, both on stamps rendered at the test set's noise level:

1. the main (parametric, ring-paired) test set: for every CNN and for the moments baseline, the
   metacal-calibrated shear ``<R>^-1 g`` (``est.metacal`` / ``metacal_measure``), with m, c (ring
   pairs) and per-galaxy sigma, so the noise cost of metacal is side by side with the
   simulation calibration;
2. real HST galaxies (``studies.metacal.real.dir``, default ``../shared/data/cosmos_real_100``,
   a validation set: nothing is fitted on it) in the +-g common-noise ring design, with m and c per
   catalogue-magnitude bin for the CNN through metacal, the CNN with its simulation calibration,
   and the classical estimators. Skipped with a recorded reason when the directory is absent.

Margin: the metacal operator needs the light beyond each 32 x 32 stamp (``wlshear.sim.metacal``),
so with a margin > 0 (``studies.metacal.margin``; null = the largest of the estimators' own,
``MetacalSettings.margin``) part 1 uses a copy of the test set (same seed: same galaxies, shears and
orientations) rendered ``32 + 2 margin`` wide, and part 2 renders that wide too; estimators without
margin see the central 32 x 32. Real galaxies are masked at ``real.mask_stage`` (default
``source``: the unlensed galaxy is masked, so each stamp is a sheared profile as on the sky; the
paper's ``image`` stage masks every lensed stamp and biases metacal, ``docs/METACAL.md``).

A CNN whose file carries no metacal settings (trained without ``metacal=default``) is
metacalibrated with the data config's PSF and noise (recorded as a note): it works, but the
network never saw counterfactual images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from wlshear.calibration.metacal import ensemble_response, metacal_measure
from wlshear.metrics.bias import bias_summary
from wlshear.metrics.binned import to_csv
from wlshear.metrics.plots import plot_bin_bias
from wlshear.metrics.shear_pairs import binned_pair_bias, calibrated_sigma, pair_bias
from wlshear.sim.constants import PIXEL_SCALE, PSF_FWHM, STAMP_SIZE
from wlshear.sim.metacal import MetacalOperator, MetacalSettings, central

log = logging.getLogger(__name__)

__all__ = ["metacal_study", "operator_for", "study_margin"]


def study_margin(scfg: dict, cnns: dict) -> int:
    """``studies.metacal.margin``, or (null) the largest margin of the CNNs' metacal settings (the
    default settings' margin when none carries settings)."""
    if scfg.get("margin") is not None:
        return int(scfg["margin"])
    own = [est.metacal_operator.settings.margin for est in cnns.values()
           if getattr(est, "metacal_operator", None) is not None]
    return int(max(own)) if own else int(MetacalSettings().margin)


def operator_for(est, data_cfg: dict, overrides: dict | None = None) -> tuple[MetacalOperator, str | None]:
    """The operator for ``est`` at the data's noise level: the estimator file's settings if it has
    them (noise level set to the data's), else built from the data config. Returns (operator, note)."""
    noise = dict(noise_scale=float(data_cfg.get("noise_scale", 1.0)), noise_kernel=data_cfg.get("noise_kernel"))
    overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    own = getattr(est, "metacal_operator", None) if est is not None else None
    if own is not None:
        settings = {**own.settings.to_dict(), **noise, **overrides}
        return MetacalOperator(MetacalSettings.from_dict(settings)), None
    settings = dict(psf_fwhm=float(data_cfg.get("psf_fwhm", PSF_FWHM)),
                    pixel_scale=float(data_cfg.get("pixel_scale", PIXEL_SCALE)),
                    stamp_size=int(data_cfg.get("stamp_size", STAMP_SIZE)), **noise, **overrides)
    note = None if est is None else "the network was not trained on metacal counterfactual images"
    return MetacalOperator(MetacalSettings(**settings)), note


def _test_rows(stamps, g_true, pair_ids, cnns, moments, data_cfg, overrides, seed) -> tuple[dict, list[str]]:
    rows, notes = {}, []
    for name, est in cnns.items():
        op, note = operator_for(est, data_cfg, overrides)
        if note:
            notes.append(f"metacal study, {name}: {note}")
        est.set_metacal(op)
        res = est.metacal(stamps, symmetrize=True, seed=seed)
        r_mean = ensemble_response(res["R"])
        g_cal = res["g"] @ np.linalg.inv(r_mean).T
        rows[f"{name}_metacal"] = {**bias_summary(g_true, g_cal, failed=res["failed"], pair_ids=pair_ids),
                                   "R_mean": r_mean.tolist()}
    if moments is not None:
        op, _ = operator_for(None, data_cfg, overrides)
        res = metacal_measure(moments.estimate, op, stamps, seed=seed)
        r_mean = ensemble_response(res["R"])
        g_cal = res["g"] @ np.linalg.inv(r_mean).T
        rows["moments_metacal"] = {**bias_summary(g_true, g_cal, failed=res["failed"], pair_ids=pair_ids),
                                   "R_mean": r_mean.tolist()}
    return rows, notes


def _real_design(rcfg: dict, renderer, seed: int):
    from wlshear.sim.render import StampRenderer
    from wlshear.sim.sources import CosmosSource

    src = CosmosSource(Path(rcfg["dir"]).expanduser(), file_name=rcfg.get("file_name"), use_real=True,
                       exclusion_level="none", mag_range=(0.0, float(rcfg.get("mag_max", 25.0))),
                       gsparams=renderer.gsparams, mask_stage=str(rcfg.get("mask_stage", "source")),
                       psf_fwhm=renderer.psf_fwhm)
    r = StampRenderer(src, renderer.noise, renderer.augment, population="natural", psf_fwhm=renderer.psf_fwhm,
                      pixel_scale=renderer.pixel_scale, stamp_size=renderer.stamp_size, gsparams=renderer.gsparams,
                      backend=renderer.backend)
    ids = np.arange(len(src.catalog["mag"]))
    return r.render_shear_pairs(ids, int(rcfg.get("n_orient", 20)), float(rcfg.get("shear", 0.02)), seed,
                                progress=True)


def _real_rows(rcfg, renderer, cnns, baselines, data_cfg, overrides, seed) -> list[dict]:
    batch, design = _real_design(rcfg, renderer, seed)
    shear = float(rcfg.get("shear", 0.02))
    edges = [float(e) for e in rcfg.get("mag_edges", [0.0, 23.0, 24.0, 25.0])]
    mags = batch.meta["mag_source"]
    g_true = batch.shear.astype(np.float64)
    estimates = {}
    for name, est in cnns.items():
        op, _ = operator_for(est, data_cfg, overrides)
        est.set_metacal(op)
        res = est.metacal(batch.stamps, symmetrize=True, seed=seed, noise_groups=design["noise_group"])
        estimates[f"{name}_metacal"] = (res["g"], res["R"])
        estimates[f"{name}_sim"] = (est.predict(central(batch.stamps), symmetrize=True), None)
    for name, b in baselines.items():
        g, bad = b.estimate(central(batch.stamps))
        estimates[name] = (np.where(np.asarray(bad)[:, None], np.nan, g), None)
        if name == "moments":
            op, _ = operator_for(None, data_cfg, overrides)
            res = metacal_measure(b.estimate, op, batch.stamps, seed=seed, noise_groups=design["noise_group"])
            estimates["moments_metacal"] = (res["g"], res["R"])
    rows = []
    for name, (g, R) in estimates.items():
        sig = calibrated_sigma(g, g_true, R)
        allb = pair_bias(g, design, shear, R=R, rng=seed)
        rows.append({"estimator": name, "bin": "all", "lo": edges[0], "hi": edges[-1], **allb,
                     "sigma1": float(sig[0]), "sigma2": float(sig[1])})
        for b in binned_pair_bias(g, design, shear, mags, edges, R=R, rng=seed):
            rows.append({"estimator": name, "bin": f"{b['lo']:g}-{b['hi']:g}", **b})
    for r in rows:
        r.pop("R", None)
    return rows, len(batch), len(batch.failures)


def metacal_study(scfg: dict, *, stamps, g_true, pair_ids, cnns: dict, baselines: dict, renderer, data_cfg: dict,
                  out_dir: Path, seed: int) -> tuple[dict, list[str]]:
    """Run the study (see the module docstring); returns (study dict for results.json, notes).

    ``stamps`` may be wider than 32 x 32 (the margin); ``renderer`` draws at that width."""
    overrides = {k: scfg.get(k) for k in ("reconv_factor", "step")}
    test_rows, notes = _test_rows(stamps, g_true, pair_ids, cnns, baselines.get("moments"), data_cfg, overrides, seed)
    for name, s in test_rows.items():
        log.info("%-18s m1=%+.4f±%.4f m2=%+.4f±%.4f c1=%+.5f c2=%+.5f sigma1=%.4f sigma2=%.4f", name, s["m1"],
                 s["m1_err"], s["m2"], s["m2_err"], s["c1"], s["c2"], s["sigma1"], s["sigma2"])
    study = {"test_set": test_rows, "margin": (int(stamps.shape[-1]) - STAMP_SIZE) // 2}
    rcfg = dict(scfg.get("real") or {})
    real_dir = rcfg.get("dir")
    if rcfg.get("enabled", True) and real_dir and Path(real_dir).expanduser().is_dir():
        real_bl = {k: v for k, v in baselines.items() if k in ("moments", "ksb")}
        rows, n, n_failed = _real_rows(rcfg, renderer, cnns, real_bl, data_cfg, overrides, seed)
        to_csv(rows, out_dir / "metacal_real.csv")
        plot_bin_bias([r for r in rows if r["bin"] != "all"], out_dir / "metacal_real.png",
                      title=f"real COSMOS galaxies (validation only), {n} stamps, +-g common-noise ring design")
        study.update({"csv": "metacal_real.csv", "png": "metacal_real.png", "real_rows": rows,
                      "real_stamps": n, "real_render_failed": n_failed,
                      "real_mask_stage": str(rcfg.get("mask_stage", "source"))})
        for r in rows:
            log.info("real %-16s %-6s m1=%+.4f±%.4f m2=%+.4f±%.4f c1=%+.5f c2=%+.5f", r["estimator"], r["bin"],
                     r["m1"], r["m1_err"], r["m2"], r["m2_err"], r["c1"], r["c2"])
    elif rcfg.get("enabled", True):
        notes.append(f"metacal study: real galaxies skipped: {real_dir} not found")
    to_csv([{"estimator": k, **{kk: v for kk, v in s.items() if not isinstance(v, (dict, list))}}
            for k, s in test_rows.items()], out_dir / "metacal_test.csv")
    study.setdefault("csv", "metacal_test.csv")
    study.setdefault("png", None)
    return study, notes
