"""Many mock cluster fields against their truth (issue 14): m, c of the CNN and of the baseline,
the relative calibration, and the pooled hold-out sigma_source, at the paper's source density.

    python benchmarks/mock_truth.py [--n-fields 100] [--estimator clash-parametric] [--work DIR]
                                    [--reuse] [--m200 6e14] [--size 1200]
                                    [--set mock.magnification=false ...]

Renders ``--n-fields`` mock fields (``conf/mock_field.yaml`` defaults: 37 sources per arcmin^2,
the WCS rolled by 30 deg, the baseline catalogue in the sky frame; seeds 0..N-1), runs
``infer_clash`` once over all of them (the estimator by name or path; default the shipped one)
and prints:

- m, c against the true reduced shear of every matched galaxy, pooled over the fields, for the
  CNN and the baseline, also restricted to galaxies inside the estimator's training prior;
- the relative calibration CNN vs baseline (pooled over the fields' calibration points) beside
  the value the truth fits predict, (1 + m_cnn) / (1 + m_base) - 1;
- the hold-out sigma_source pooled over the fields (CNN, baseline, and the CNN after the
  relative calibration) beside the CNN's sigma on simulated test-side stamps of its population.

The report is printed and appended to ``benchmarks/RESULTS_mock_truth.md`` (or ``--results``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def rel(path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def make_fields(n: int, work: Path, reuse: bool, overrides: list[str]) -> list[dict]:
    from tqdm import tqdm

    from wlshear.clash.mock import make_mock_field
    from wlshear.tasks.mock_field import mock_config
    from wlshear.utils.hydra import compose_config

    clusters = []
    for seed in tqdm(range(n), desc="mock fields"):
        name = f"mock{seed:03d}"
        d = work / "fields" / name
        js = d / f"{name}_mock.json"
        if not (reuse and js.is_file()):
            cfg = compose_config("mock_field", [f"out={d}", f"seed={seed}", "progress=false",
                                                f"mock.cluster={name}", *overrides])
            make_mock_field(mock_config(cfg), d)
        z = json.loads(js.read_text())["truth"]["z_lens"]
        clusters.append({"name": name, "dir": str(d), "redshift": z,
                         "catalogue": str(d / f"{name}_wl_catalogue.fits"), "truth": str(js)})
    return clusters


def sim_sigma(estimator: str, n: int) -> list[float]:
    """The estimator's per-galaxy sigma (8-fold average, own calibration) on ``n`` test-side stamps
    of the embedded default population at full noise (torch renderer)."""
    from hydra.utils import instantiate

    import wlshear
    from wlshear.metrics.bias import fit_bias
    from wlshear.utils.hydra import compose_config

    est = wlshear.load_estimator(estimator)
    dm = instantiate(compose_config("evaluate").data)
    b = dm.eval_renderer.with_backend("torch").simulate(n, seed=[2026, 12, 4, 7], ring=False)
    g = est.predict(b.stamps[:, None], symmetrize=True)
    return list(np.asarray(fit_bias(np.stack([b.meta["g1"], b.meta["g2"]], 1), g).sigma, dtype=float))


#: nearest-truth distance bins [px] of the detection diagnosis
DIST_EDGES = (0.0, 1.0, 2.0, 4.0, 10.0, np.inf)


def diagnose(summary: dict, clusters: list[dict], scales_arcsec=(19.5,), seed: int = 0) -> list[str]:
    """Where the field's hold-out sigma_source comes from: every used galaxy of every field matched
    to its nearest true galaxy. Per bin of that distance [px]: the fraction of used galaxies and the
    RMS of (CNN - truth) and (baseline - truth); then the hold-out sigma_source pooled over the
    fields (same split per field) for the CNN on all used galaxies, on those within 2 px of a true
    galaxy, for the baseline, and for the true shear itself (the part of the hold-out residual that
    is field structure the smoothed map cannot follow, not per-galaxy error), at every map scale."""
    from astropy.table import Table
    from scipy.spatial import cKDTree

    from wlshear.clash.errors import holdout_sigma_source, pooled_sigma_source
    from wlshear.clash.pipeline import TRUTH_MATCH_PX, truth_catalogue_path

    keys = ("CNN, all used", f"CNN, within {TRUTH_MATCH_PX:g} px of a true galaxy", "baseline",
            "true shear (structure term)")
    rows, hold = [], {(k, float(sc)): [] for k in keys for sc in scales_arcsec}
    by_name = {c["name"]: c for c in clusters}
    for name, res in summary["clusters"].items():
        if res.get("status") != "ok":
            continue
        cat = Table.read(res["files"]["catalogue"])
        truth = Table.read(truth_catalogue_path(by_name[name]))
        gal = ~np.asarray(truth["is_star"], bool) if "is_star" in truth.colnames else np.ones(len(truth), bool)
        t_xy = np.c_[np.asarray(truth["x"], float), np.asarray(truth["y"], float)][gal]
        t_g = np.c_[np.asarray(truth["g1"], float), np.asarray(truth["g2"], float)][gal]
        use = np.asarray(cat["flags"]) == 0
        x, y = np.asarray(cat["x"], float)[use], np.asarray(cat["y"], float)[use]
        g = np.c_[np.asarray(cat["g1"], float), np.asarray(cat["g2"], float)][use]
        gb = (np.c_[np.asarray(cat["g1_base"], float), np.asarray(cat["g2_base"], float)][use]
              if "g1_base" in cat.colnames else np.full_like(g, np.nan))
        d, i = cKDTree(t_xy).query(np.c_[x, y])
        gt = t_g[i]
        rows.append(np.c_[d, g, gb, gt])
        if len(x) < 20:
            continue
        near = d < TRUTH_MATCH_PX
        for key, (sel, gg) in zip(keys, ((slice(None), g), (near, g[near] if near.sum() else g[:0]),
                                          (slice(None), gb), (slice(None), gt))):
            xs, ys = x[sel], y[sel]
            ok = np.isfinite(gg).all(axis=1)
            if ok.sum() < 10:
                continue
            for sc in scales_arcsec:
                r = holdout_sigma_source(xs[ok], ys[ok], gg[ok], float(sc), 50, 0.5, np.random.default_rng(seed))
                hold[(key, float(sc))].append({"sigma_source": [float(v) for v in r["sigma_source"]],
                                               "n_test": r["n_test"]})
    a = np.concatenate(rows) if rows else np.zeros((0, 7))
    d, g, gb, gt = a[:, 0], a[:, 1:3], a[:, 3:5], a[:, 5:7]
    lines = [f"where the hold-out error comes from ({len(d)} used galaxies, nearest true galaxy):",
             "  distance [px] | fraction | RMS(CNN - truth) g1 / g2 | RMS(baseline - truth) g1 / g2"]
    for lo, hi in zip(DIST_EDGES[:-1], DIST_EDGES[1:]):
        k = (d >= lo) & (d < hi)
        if not k.any():
            continue
        rc = np.sqrt(np.nanmean((g[k] - gt[k]) ** 2, axis=0))
        rb = np.sqrt(np.nanmean((gb[k] - gt[k]) ** 2, axis=0)) if np.isfinite(gb[k]).any() else [np.nan] * 2
        lines.append(f"  {lo:g}-{hi:g} | {k.mean():.3f} | {rc[0]:.3f} / {rc[1]:.3f} | {rb[0]:.3f} / {rb[1]:.3f}")
    lines.append("  hold-out sigma_source pooled over the fields (50 bootstrap maps, one split seed per field), g1 / g2:")
    lines.append("    " + " " * 40 + "".join(f"| lambda {float(sc):g}\"    " for sc in scales_arcsec))
    for key in keys:
        cells = []
        for sc in scales_arcsec:
            p = pooled_sigma_source(hold[(key, float(sc))])
            cells.append(f"| {p['sigma_source'][0]:.3f} / {p['sigma_source'][1]:.3f} " if p else "| n/a ")
        lines.append(f"    {key:40s}" + "".join(cells))
    return lines


def _fmt_fit(f: dict | None) -> str:
    if not f:
        return "n/a"
    return (f"m1 {f['m1']:+.3f} +- {f['m1_err']:.3f}, m2 {f['m2']:+.3f} +- {f['m2_err']:.3f}, "
            f"c1 {f['c1']:+.4f} +- {f['c1_err']:.4f}, c2 {f['c2']:+.4f} +- {f['c2_err']:.4f}, "
            f"sigma {f['sigma1']:.3f} / {f['sigma2']:.3f}")


def _fmt_sigma(s: dict | None) -> str:
    if not s:
        return "n/a"
    v, e = s["sigma_source"], s["sigma_source_err"]
    err = [f"{x:.3f}" if x is not None and np.isfinite(x) else "?" for x in e]
    return f"{v[0]:.3f} +- {err[0]} / {v[1]:.3f} +- {err[1]} ({s['n_clusters'][0]} fields, {s['n_test']} test galaxies)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-fields", type=int, default=100)
    ap.add_argument("--estimator", default="clash-parametric", help="shipped name or estimator file")
    ap.add_argument("--work", default="outputs/benchmarks/mock_truth", help="work directory (relative: to the repository)")
    ap.add_argument("--reuse", action="store_true", help="reuse mock fields already in --work")
    ap.add_argument("--m200", type=float, default=None, help="NFW mass [Msun] (default: conf/mock_field.yaml)")
    ap.add_argument("--size", type=int, default=None, help="field side [px] (default: conf/mock_field.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra conf/mock_field.yaml override, e.g. --set mock.magnification=false (repeatable)")
    ap.add_argument("--infer-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra conf/infer_clash.yaml override, e.g. --infer-set 'maps.scales_arcsec=[6.5,13,19.5]'")
    ap.add_argument("--n-sim", type=int, default=20000, help="simulated stamps for the CNN's test-side sigma")
    ap.add_argument("--results", default="benchmarks/RESULTS_mock_truth.md")
    args = ap.parse_args(argv)

    from _machine import append_results, machine_header
    from wlshear.tasks.infer_clash import run
    from wlshear.utils.hydra import compose_config

    t0 = time.time()
    work = REPO / args.work
    overrides = ([f"mock.m200={args.m200}"] if args.m200 else []) + ([f"mock.size={args.size}"] if args.size else [])
    overrides += list(args.set)
    clusters = make_fields(args.n_fields, work, args.reuse, overrides)
    t_fields = time.time() - t0
    cfg = compose_config("infer_clash", [f"paths.root_dir={REPO}", f"paths.output_dir={work / 'infer'}",
                                         "extras.print_config=false", f"estimator={args.estimator}", *args.infer_set])
    cfg.clusters = clusters
    t1 = time.time()
    summary = run(cfg)
    t_infer = time.time() - t1
    tb = summary.get("truth_bias_pooled") or {}
    cal = summary.get("calibration_pooled") or {}
    sig = summary.get("sigma_source_pooled") or {}
    ok = [c for c in summary["clusters"].values() if c.get("status") == "ok"]
    n_gal = sum(c["n_galaxies"] for c in ok)
    mock = json.loads(Path(clusters[0]["truth"]).read_text())
    lines = [machine_header(), f"command: python benchmarks/mock_truth.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"fields: {len(ok)} of {len(clusters)} ok ({summary['n_failed']} failed), {n_gal} galaxies after cuts "
             f"({n_gal / max(len(ok), 1):.0f} per field); each {mock['shape'][1]}x{mock['shape'][0]} px, "
             f"{mock['n_galaxies']} galaxies drawn, NFW M200 {mock['truth']['m200']:.2e}, WCS rolled "
             f"{mock['config'].get('wcs_rotation_deg', 0)} deg, baseline catalogue in the sky frame",
             f"estimator: {rel(summary['estimator'])}; wall time: fields {t_fields:.0f} s, infer_clash {t_infer:.0f} s",
             f"against the truth ({tb.get('n_matched', 0)} matched galaxies, pooled):",
             f"  CNN       {_fmt_fit(tb.get('cnn'))}",
             f"  baseline  {_fmt_fit(tb.get('baseline'))}"]
    wp = tb.get("within_prior") or {}
    if wp:
        lines += [f"  inside the training prior |g_i| < {wp['shear_max']} ({wp.get('n_matched', 0)} galaxies):",
                  f"  CNN       {_fmt_fit(wp.get('cnn'))}",
                  f"  baseline  {_fmt_fit(wp.get('baseline'))}"]
    if "m1" in cal and tb.get("cnn") and tb.get("baseline"):
        pred = [(1 + tb["cnn"][f"m{i}"]) / (1 + tb["baseline"][f"m{i}"]) - 1 for i in (1, 2)]
        ce = [cal.get(f"m{i}_err_clusters", float("nan")) for i in (1, 2)]
        lines.append(f"relative calibration CNN vs baseline (pooled calibration points): m1 {cal['m1']:+.3f} +- "
                     f"{cal['m1_err']:.3f} (fields resampled: +- {ce[0]:.3f}), m2 {cal['m2']:+.3f} +- "
                     f"{cal['m2_err']:.3f} (+- {ce[1]:.3f}); the truth fits predict {pred[0]:+.3f} / {pred[1]:+.3f}")
    s_sim = sim_sigma(args.estimator, args.n_sim)
    lines += ["hold-out sigma_source pooled over the fields (g1 / g2):",
              f"  CNN                   {_fmt_sigma(sig.get('cnn'))}",
              f"  CNN, recalibrated     {_fmt_sigma(sig.get('recalibrated'))}",
              f"  baseline              {_fmt_sigma(sig.get('baseline'))}",
              f"  CNN on {args.n_sim} simulated test-side stamps (no field): {s_sim[0]:.3f} / {s_sim[1]:.3f}"]
    if sig.get("cnn"):
        r = [sig["cnn"]["sigma_source"][i] / s_sim[i] for i in (0, 1)]
        lines.append(f"  ratio field / simulated: {r[0]:.3f} / {r[1]:.3f}")
        if "m1" in cal:  # (g - c) / (1 + m) scales every residual, and so sigma_source, by 1 / (1 + m)
            rc = [sig["cnn"]["sigma_source"][i] / (1 + cal[f"m{i + 1}"]) for i in (0, 1)]
            lines.append(f"  CNN after the pooled relative calibration: {rc[0]:.3f} / {rc[1]:.3f} "
                         f"(ratio to simulated {rc[0] / s_sim[0]:.3f} / {rc[1] / s_sim[1]:.3f})")
    lines += diagnose(summary, clusters, [float(v) for v in cfg.maps.scales_arcsec])
    lines.append(f"total time {time.time() - t0:.0f} s; per-field results in {rel(work / 'infer')}")
    report = "\n".join(lines)
    print(report)
    append_results(REPO / args.results, f"mock_truth {time.strftime('%Y-%m-%d %H:%M:%S')}", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
