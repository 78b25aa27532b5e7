"""CLASH field inference: CNN shears, shear maps, per-galaxy errors and relative calibration.

Steps per cluster (each uses the plain functions of :mod:`wlshear.clash`):

1. ``io.load_field``: read the n filters, total image = mean, ivar = n^2 / sum(1/w); pixels with
   weight < ``io.min_weight`` (or NaN) in any filter are bad (image 0, ivar 0).
2. ``detection.detect_sources`` on the total image; ``detection.match_catalogue`` to the baseline
   catalogue within ``detection.match_radius_arcsec`` (0.65").
3. ``cuts.apply_cuts``: edge, bad pixels, mean ivar in the 32 px box, photometry, stars (with the
   (mag, mu_max) / (mag, radius) diagnostic PNG), unmatched (if ``cuts.require_match``).
4. ``stamps.extract_stamps`` (32x32) and the CNN (``ShearEstimator.predict_with_flags``,
   symmetrised, calibrated) on the selected sources; CNN failures get ``FLAG_CNN_FAILED``.
5. Shear maps per scale (``maps.shear_map``, ``maps.bootstrap_maps``) -> FITS with the map WCS,
   whisker PNG. The bootstrap uses one set of resample indices for the CNN and the baseline.
6. ``errors.holdout_sigma_source`` (hold-out 50%) for the CNN and the baseline.
7. Maps of both estimators sampled at 1/10 of the source density (``errors.subsample_positions``)
   with bootstrap variances and covariance from the *same* resamples; pooled over all clusters
   of the run into ``errors.relative_calibration`` (CNN = (1 + m) baseline + c).
8. Tangential-shear profile (``lensing.shear_profile``) around the configured centre (default:
   image centre), CSV + PNG, with the NFW model when the cluster gives its truth parameters.

Output flag bits of the shear catalogue: the ``wlshear.clash.cuts`` bits (1 edge, 2 bad pixels,
4 low ivar, 8 star, 16 photometry, 32 unmatched) plus 64 = CNN failed (non-finite stamp/output).
``flags == 0`` rows are the galaxies used for maps, errors and profiles.

Failure policy: any exception while processing a cluster is caught, logged and recorded (type and
message) under ``clusters.<name>`` and ``failed`` in ``run_summary.json``; the remaining clusters
still run. ``infer_clash.py`` exits with ``fail_exit_code`` (default 1) if any cluster failed.
A missing/unreadable estimator or an empty cluster list is a configuration error raised at once.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
from astropy.table import Table
from omegaconf import DictConfig
from tqdm.auto import tqdm

from wlshear.clash import cuts as cutsmod
from wlshear.clash.detection import detect_sources, match_catalogue
from wlshear.clash.errors import holdout_sigma_source, relative_calibration, subsample_positions
from wlshear.clash.io import load_field, read_catalogue
from wlshear.clash.lensing import nfw_gt_model, shear_profile
from wlshear.clash.maps import (
    bootstrap_at,
    bootstrap_indices,
    bootstrap_maps,
    make_grid,
    shear_map,
    write_map_fits,
)
from wlshear.clash.stamps import extract_stamps
from wlshear.metrics.plots import plot_profile, plot_star_galaxy, plot_whiskers
from wlshear.utils.hydra import print_config_tree, save_resolved_config, write_json
from wlshear.utils.plain import to_plain
from wlshear.tasks.rules import RELATIONS, INFER_CLASH_RULES
from wlshear.utils.validate import validate_config

log = logging.getLogger(__name__)

FLAG_CNN_FAILED = 64


class ClusterError(ValueError):
    """A cluster's input is unusable (message says what and how to fix it)."""


# ----------------------------------------------------------------------------- config helpers


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


def _load_truth(spec, redshift) -> dict | None:
    """NFW truth from a mock ``*_mock.json`` path or a dict {m200, conc, z_source[, z_lens, center]}."""
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ClusterError(f"truth file {path} does not exist (the mock writes <cluster>_mock.json)")
        spec = json.loads(path.read_text()).get("truth", {})
    spec = dict(spec)
    missing = [k for k in ("m200", "conc", "z_source") if k not in spec]
    if missing:
        raise ClusterError(f"truth {spec} lacks {missing}; need m200 [Msun], conc, z_source (z_lens = redshift)")
    spec.setdefault("z_lens", redshift)
    if spec["z_lens"] is None:
        raise ClusterError("truth needs z_lens or the cluster's redshift")
    return spec


def _center(c: dict, field_, truth) -> tuple[float, float]:
    ny, nx = field_.shape
    if c.get("center") is not None:
        xc, yc = (float(v) for v in c["center"])
    elif c.get("center_radec") is not None:
        ra, dec = (float(v) for v in c["center_radec"])
        xc, yc = (float(v) for v in field_.wcs.world_to_pixel_values(ra, dec))
    elif truth is not None and truth.get("center") is not None:
        xc, yc = (float(v) for v in truth["center"])
    else:
        xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    if not (np.isfinite(xc) and np.isfinite(yc)):
        raise ClusterError(f"cluster centre ({xc}, {yc}) is not finite")
    return xc, yc


# ----------------------------------------------------------------------------- one cluster


def _baseline_from_catalogue(c: dict, det, radius: float):
    """Read the baseline catalogue and match it; returns (matched, idx, g_base (N,2) or None, info)."""
    path = c.get("catalogue")
    n = len(det)
    if not path:
        return None, np.full(n, -1), None, {"catalogue": None}
    cat = read_catalogue(path)  # FileNotFoundError / ValueError (no RA/Dec) -> cluster fails
    idx, sep, matched = match_catalogue(det, cat, radius)
    info = {"catalogue": str(path), "n_catalogue": len(cat), "n_matched": int(matched.sum()),
            "median_sep_arcsec": float(np.median(sep[matched])) if matched.any() else None}
    g = None
    if "g1" in cat.colnames and "g2" in cat.colnames:
        g = np.full((n, 2), np.nan)
        g1 = np.asarray(cat["g1"], dtype=np.float64)
        g2 = np.asarray(cat["g2"], dtype=np.float64)
        g[matched, 0] = g1[idx[matched]]
        g[matched, 1] = g2[idx[matched]]
    else:
        info["baseline_note"] = f"catalogue has no G1/G2 columns ({cat.colnames}); no baseline comparison"
    return matched, idx, g, info


def process_cluster(c: dict, cfg, estimator, out_root: Path, rng: np.random.Generator) -> dict:
    """Run every step on one cluster; returns its summary and the sampled calibration points."""
    t0 = time.time()
    name = c["name"]
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    redshift = c.get("redshift")
    truth = _load_truth(c.get("truth"), redshift)
    summary: dict = {"name": name, "dir": str(c["dir"]), "redshift": redshift, "status": "running"}
    progress = bool(cfg.get("progress", True))

    # 1. load and combine
    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always", UserWarning)
        kw = {"pattern": c["pattern"]} if c.get("pattern") else {}
        field_ = load_field(c["dir"], name, c.get("filters"), min_weight=float(cfg.io.min_weight), **kw)
    summary["warnings"] = [str(w.message) for w in wlist if issubclass(w.category, UserWarning)]
    if field_.missing_filters and cfg.io.get("require_all_filters", False):
        raise ClusterError(f"filters {field_.missing_filters} missing for {name} and io.require_all_filters is true")
    ny, nx = field_.shape
    summary.update({
        "shape": [ny, nx], "filters": field_.filters, "missing_filters": field_.missing_filters,
        "n_bad_pixels": int(field_.bad.sum()), "frac_bad_pixels": float(field_.bad.mean()),
        "median_ivar": float(np.median(field_.ivar[field_.ivar > 0])) if (field_.ivar > 0).any() else 0.0,
    })
    if field_.bad.all():
        raise ClusterError(f"every pixel of {name} is bad (weight < {cfg.io.min_weight} or NaN in some filter)")
    log.info("[%s] %dx%d px, %d filters, %.1f%% bad pixels", name, nx, ny, len(field_.filters), 100 * field_.bad.mean())

    # 2. detection + matching
    d = cfg.detection
    det = detect_sources(field_.image, field_.ivar, field_.bad, field_.wcs, thresh=float(d.thresh),
                         minarea=int(d.minarea), deblend_nthresh=int(d.deblend_nthresh),
                         deblend_cont=float(d.deblend_cont), bkg_box=int(d.bkg_box),
                         pixel_scale=field_.pixel_scale)
    summary["n_detected"] = len(det)
    if len(det) == 0:
        raise ClusterError(f"no sources detected in {name}; check the images and detection.thresh")
    matched, cat_idx, g_base, base_info = _baseline_from_catalogue(c, det, float(d.match_radius_arcsec))
    summary["baseline"] = base_info

    # 3. cuts
    ccfg = cfg.cuts
    flags, cut_summary = cutsmod.apply_cuts(
        det, field_.shape, field_.bad, field_.ivar, min_mean_ivar=float(ccfg.min_mean_ivar),
        matched=matched if (matched is not None and ccfg.get("require_match", True)) else None,
        star_kwargs=_plain(ccfg.get("star")) or None,
    )
    summary["cuts"] = cut_summary
    is_star = (flags & cutsmod.CUT_STAR) != 0
    if ccfg.get("star_plot", True):
        plot_star_galaxy(det, is_star, out / f"{name}_star_galaxy.png", cut_summary["star_params"],
                                 title=f"{name}: star/galaxy separation")

    # 4. stamps + CNN on the selected sources
    x = np.asarray(det["x"], dtype=np.float64)
    y = np.asarray(det["y"], dtype=np.float64)
    sel = np.flatnonzero(flags == 0)
    g_cnn = np.full((len(det), 2), np.nan)
    metacal = str(cfg.get("shear_calibration", "simulation")) == "metacal"
    resp = np.full((len(det), 2, 2), np.nan)
    if sel.size:
        stamps, _, sflags = extract_stamps(field_.image, x[sel], y[sel], 32)
        if metacal:
            mc = estimator.metacal(stamps, symmetrize=bool(cfg.symmetrize), batch_size=int(cfg.batch_size),
                                   seed=int(cfg.seed), progress=progress)
            g, failed = mc["g"], mc["failed"] | ~np.isfinite(mc["R"]).all(axis=(1, 2))
            resp[sel] = mc["R"]
        else:
            g, failed = estimator.predict_with_flags(stamps, symmetrize=bool(cfg.symmetrize),
                                                     batch_size=int(cfg.batch_size), progress=progress)
        failed |= sflags != 0
        g_cnn[sel] = np.where(failed[:, None], np.nan, g)
        flags[sel[failed]] |= FLAG_CNN_FAILED
    use = flags == 0
    if metacal and use.any():
        # metacal: every selected galaxy's shear divided by the field's mean response <R> (the cuts are
        # made on the observed image's photometry, not on counterfactuals: no selection response)
        from wlshear.calibration.metacal import ensemble_response

        r_mean = ensemble_response(resp[use])
        g_cnn[use] = g_cnn[use] @ np.linalg.inv(r_mean).T
        summary["metacal_R_mean"] = r_mean.tolist()
        log.info("[%s] metacal: <R> = %s over %d galaxies", name, np.round(r_mean, 4).tolist(), int(use.sum()))
    summary["n_cnn_failed"] = int(((flags & FLAG_CNN_FAILED) != 0).sum())
    summary["n_galaxies"] = int(use.sum())
    summary["density_per_arcmin2"] = float(use.sum() / ((~field_.bad).sum() * (field_.pixel_scale / 60) ** 2))
    log.info("[%s] %d detections -> %d galaxies after cuts (%s)", name, len(det), use.sum(),
             ", ".join(f"{k[2:]}={v}" for k, v in cut_summary.items() if k.startswith("n_") and not k.startswith("n_only")))

    # catalogue
    catalogue = Table({
        "id": np.asarray(det["id"]), "ra": np.asarray(det["ra"]), "dec": np.asarray(det["dec"]), "x": x, "y": y,
        "g1": g_cnn[:, 0], "g2": g_cnn[:, 1], "flags": flags,
        "mag": np.asarray(det["mag"]), "radius": np.asarray(det["flux_radius"]),
        "mu_max": np.asarray(det["mu_max"]), "flux": np.asarray(det["flux"]),
    })
    if matched is not None:
        catalogue["matched"] = matched
        catalogue["cat_index"] = np.where(matched, cat_idx, -1)
    if g_base is not None:
        catalogue["g1_base"] = g_base[:, 0]
        catalogue["g2_base"] = g_base[:, 1]
    if metacal:
        for i in (0, 1):
            for j in (0, 1):
                catalogue[f"R{i + 1}{j + 1}"] = resp[:, i, j]
    catalogue.meta.update({"CLUSTER": name, "FLAGBITS": "1 edge 2 badpix 4 lowivar 8 star 16 phot 32 unmatch 64 cnnfail",
                           "CALIB": "metacal" if metacal else "simulation"})
    cat_path = out / f"{name}_shear_catalogue.fits"
    catalogue.write(cat_path, overwrite=True)
    files = {"catalogue": str(cat_path)}
    if use.sum() < 10:
        raise ClusterError(f"only {int(use.sum())} galaxies pass the cuts in {name} (need >= 10 for maps and errors); "
                           f"cut counts: { {k: v for k, v in cut_summary.items() if k.startswith('n_')} }")

    # 5. maps
    mcfg = cfg.maps
    scales = [float(s) for s in mcfg.scales_arcsec]
    if not scales:
        raise ValueError("maps.scales_arcsec is empty")
    n_boot = int(mcfg.n_boot)
    grid = make_grid(field_.shape, float(mcfg.cell_arcsec), field_.pixel_scale)
    gu = g_cnn[use]
    xu, yu = x[use], y[use]
    has_base = g_base is not None
    common = use & np.isfinite(g_base).all(axis=1) if has_base else np.zeros_like(use)
    summary["n_common"] = int(common.sum())
    if has_base and common.sum() < 10:
        summary["baseline"]["comparison_note"] = f"only {int(common.sum())} galaxies with both shears: no comparison"
        has_base = False
    # same resample index sets for CNN and baseline (on the common galaxies)
    ci = np.flatnonzero(common)
    idx_common = bootstrap_indices(ci.size, n_boot, rng) if has_base else None
    idx_use = bootstrap_indices(int(use.sum()), n_boot, rng)
    files["maps"], files["whiskers"] = {}, {}
    it = tqdm(scales, desc=f"[{name}] maps", disable=not progress)
    for s in it:
        maps, dens = shear_map(xu, yu, gu, grid, s, field_.pixel_scale)
        sig = bootstrap_maps(xu, yu, gu, grid, s, index_sets=idx_use, pixel_scale=field_.pixel_scale)
        out_maps = {"G1": maps[0], "G2": maps[1], "SIGMA_G1": sig[0], "SIGMA_G2": sig[1], "DENSITY": dens}
        if has_base:
            xc_, yc_ = x[ci], y[ci]
            bmaps, _ = shear_map(xc_, yc_, g_base[ci], grid, s, field_.pixel_scale)
            bsig, bs = bootstrap_maps(xc_, yc_, g_base[ci], grid, s, index_sets=idx_common,
                                      pixel_scale=field_.pixel_scale, return_samples=True)
            _, cs = bootstrap_maps(xc_, yc_, g_cnn[ci], grid, s, index_sets=idx_common,
                                   pixel_scale=field_.pixel_scale, return_samples=True)
            from wlshear.clash.maps import bootstrap_covariance

            cov = bootstrap_covariance(cs, bs)
            out_maps.update({"BASE_G1": bmaps[0], "BASE_G2": bmaps[1], "SIGMA_BASE_G1": bsig[0],
                             "SIGMA_BASE_G2": bsig[1], "COV_G1": cov[0], "COV_G2": cov[1]})
            del bs, cs
        tag = f"{s:g}".replace(".", "p")
        mp = write_map_fits(out / f"{name}_maps_{tag}arcsec.fits", out_maps, grid, field_.wcs,
                            meta={"LAMBDA": s, "CLUSTER": name, "NBOOT": n_boot, "NGAL": int(use.sum())})
        wp = plot_whiskers(maps[0], maps[1], grid, out / f"{name}_whiskers_{tag}arcsec.png",
                           every=mcfg.get("whisker_every"), background=field_.image,
                           title=f"{name}: CNN shear, lambda = {s:g}\" ({int(use.sum())} galaxies)")
        files["maps"][str(s)] = str(mp)
        files["whiskers"][str(s)] = str(wp)

    # 6. hold-out per-galaxy errors (main scale)
    s0 = scales[0]
    hf = float(cfg.holdout_fraction)
    split_seed = int(rng.integers(2**31))
    ho = {"scale_arcsec": s0, "holdout_fraction": hf}
    r = holdout_sigma_source(xu, yu, gu, s0, n_boot, hf, np.random.default_rng(split_seed), field_.pixel_scale)
    ho["cnn"] = _ho_summary(r)
    if has_base:
        for key, gg in (("baseline", g_base[ci]), ("cnn_common", g_cnn[ci])):
            r = holdout_sigma_source(x[ci], y[ci], gg, s0, n_boot, hf, np.random.default_rng(split_seed), field_.pixel_scale)
            ho[key] = _ho_summary(r)
    summary["sigma_source"] = ho

    # 7. calibration points: both maps at 1/10 of the source density, same resamples
    points = None
    if has_base:
        cal = cfg.calibration
        k = subsample_positions(ci.size, float(cal.sample_fraction), rng)
        xq, yq = x[ci][k], y[ci][k]
        bb = bootstrap_at(x[ci], y[ci], g_base[ci], xq, yq, s0, index_sets=idx_common, pixel_scale=field_.pixel_scale)
        bc = bootstrap_at(x[ci], y[ci], g_cnn[ci], xq, yq, s0, index_sets=idx_common, pixel_scale=field_.pixel_scale)
        from wlshear.clash.maps import smooth_at

        ref = smooth_at(x[ci], y[ci], g_base[ci], xq, yq, s0, field_.pixel_scale)
        est = smooth_at(x[ci], y[ci], g_cnn[ci], xq, yq, s0, field_.pixel_scale)
        points = {
            "ref": ref, "est": est,
            "var_ref": np.nanvar(bb, axis=0, ddof=1), "var_est": np.nanvar(bc, axis=0, ddof=1),
            "cov": np.nanmean((bb - np.nanmean(bb, 0)) * (bc - np.nanmean(bc, 0)), axis=0) * bb.shape[0] / (bb.shape[0] - 1),
        }
        summary["n_calibration_points"] = int(k.size)
        if k.size >= int(cal.min_points):
            try:
                fits_ = relative_calibration(points["ref"], points["est"], points["var_ref"], points["var_est"],
                                             points["cov"], n_boot=int(cal.n_boot), rng=rng)
                summary["calibration"] = _cal_summary(fits_)
            except ValueError as exc:
                summary["calibration"] = {"error": str(exc)}

    # 8. tangential profile
    xc, yc = _center(c, field_, truth)
    bins = np.asarray(cfg.profile.bins_arcsec, dtype=np.float64)
    prof = shear_profile(xu, yu, gu[:, 0], gu[:, 1], (xc, yc), bins, pixel_scale=field_.pixel_scale)
    prof_b = None
    if has_base:
        prof_b = shear_profile(x[ci], y[ci], g_base[ci, 0], g_base[ci, 1], (xc, yc), bins, pixel_scale=field_.pixel_scale)
    table = Table({"r_lo": prof["r_lo"], "r_hi": prof["r_hi"], "r_mean": prof["r_mean"], "n": prof["n"],
                   "gt_cnn": prof["gt"], "gt_err_cnn": prof["gt_err"], "gx_cnn": prof["gx"], "gx_err_cnn": prof["gx_err"]})
    minn = int(cfg.profile.get("min_per_bin", 5))
    for col in ("gt_cnn", "gt_err_cnn", "gx_cnn", "gx_err_cnn"):
        table[col][table["n"] < minn] = np.nan
    if prof_b is not None:
        table["n_base"] = prof_b["n"]
        for a, b in (("gt", "gt_base"), ("gt_err", "gt_err_base"), ("gx", "gx_base"), ("gx_err", "gx_err_base")):
            table[b] = np.where(prof_b["n"] >= minn, prof_b[a], np.nan)
    model = None
    if truth is not None:
        rr = np.where(np.isfinite(table["r_mean"]), table["r_mean"], 0.5 * (table["r_lo"] + table["r_hi"]))
        table["gt_nfw"] = nfw_gt_model(rr, truth)
        rm = np.geomspace(max(bins[0], 1.0), bins[-1], 100)
        model = (rm, nfw_gt_model(rm, truth))
    prof_csv = out / f"{name}_profile.csv"
    table.write(prof_csv, format="ascii.csv", overwrite=True)
    prof_png = out / f"{name}_profile.png"
    pc = table.copy()
    pc["gt"], pc["gt_err"], pc["gx"], pc["gx_err"] = table["gt_cnn"], table["gt_err_cnn"], table["gx_cnn"], table["gx_err_cnn"]
    pb = None
    if prof_b is not None:
        pb = table.copy()
        pb["gt"], pb["gt_err"], pb["gx"], pb["gx_err"] = table["gt_base"], table["gt_err_base"], table["gx_base"], table["gx_err_base"]
    plot_profile(prof_png, pc, pb, model, f"{name}: tangential shear around ({xc:.0f}, {yc:.0f}) px")
    files.update({"profile_csv": str(prof_csv), "profile_png": str(prof_png)})
    summary["center_px"] = [xc, yc]
    summary["truth"] = truth
    summary["files"] = files
    summary["status"] = "ok"
    summary["wall_time_s"] = time.time() - t0
    write_json(summary, out / f"{name}_summary.json")
    return {"summary": summary, "points": points}


def _ho_summary(r: dict) -> dict:
    return {
        "sigma_source": [float(v) for v in r["sigma_source"]],
        "sigma_field_source": [float(v) for v in r["sigma_field_source"]],
        "sigma_field": [float(v) for v in r["sigma_field"]],
        "sigma_source_mean": float(np.sqrt(np.nanmean(np.asarray(r["sigma_source"]) ** 2))),
        "negative": [bool(v) for v in r["negative"]],
        "n_train": r["n_train"], "n_test": r["n_test"],
    }


def _cal_summary(fits_: list[dict]) -> dict:
    out = {}
    for k, f in enumerate(fits_, start=1):
        for key in ("m", "m_err", "c", "c_err", "m_err_boot", "c_err_boot", "chi2", "ndof", "n", "success"):
            if key in f:  # m -> m1, m_err -> m1_err, chi2 -> chi2_1, ...
                name = f"{key[0]}{k}{key[1:]}" if key[0] in "mc" and key[1:2] in ("", "_") else f"{key}_{k}"
                out[name] = f[key]
    return out


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
    lines += ["", "Published (CLASH, 20 clusters): m1 0.048 ± 0.024, m2 0.057 ± 0.024, c1 0.000 ± 0.002, c2 0.005 ± 0.002.", ""]
    lines += ["## Per-galaxy statistical error (hold-out)", "",
              "| cluster | status | galaxies | sigma_source CNN (g1, g2) | CNN on common | baseline |",
              "|---|---|---|---|---|---|"]
    for name, s in run_summary["clusters"].items():
        if s.get("status") != "ok":
            lines.append(f"| {name} | FAILED: {s.get('error', '')[:120]} | | | | |")
            continue
        ho = s.get("sigma_source", {})

        def pair(k):
            v = ho.get(k)
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


def run(cfg: DictConfig) -> dict:
    """Process every configured cluster (module docstring); returns the run summary dict."""
    from wlshear.models.estimator import load_estimator

    t0 = time.time()
    validate_config(cfg, INFER_CLASH_RULES, "infer_clash config", RELATIONS)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out_dir)
    if cfg.get("extras", {}).get("print_config", False):
        print_config_tree(cfg, order=("clusters", "estimator", "maps", "cuts", "detection", "paths"),
                          save_to=out_dir / "config_tree.txt")
    if cfg.get("estimator") in (None, ""):
        raise ValueError("infer_clash: set `estimator=<path>` (train.py writes <run_dir>/estimator_refit.pt)")
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
    pooled = []
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

    if pooled:
        keys = ("ref", "est", "var_ref", "var_est", "cov")
        pts = {k: np.concatenate([p[k] for p in pooled]) for k in keys}
        try:
            fits_ = relative_calibration(pts["ref"], pts["est"], pts["var_ref"], pts["var_est"], pts["cov"],
                                         n_boot=int(cfg.calibration.n_boot), rng=rng)
            run_summary["calibration_pooled"] = _cal_summary(fits_)
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
