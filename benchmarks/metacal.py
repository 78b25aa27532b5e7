"""Metacalibration benchmark (issue #13): per-magnitude-bin m, c on real galaxies it never saw.

Design: the +-g common-noise design with 90-degree ring twins
(``StampRenderer.render_shear_pairs``): every galaxy at ``--n-orient`` random orientations, each
orientation and its ring twin under (+-g0, 0) and (0, +-g0), the two opposite shears sharing one
noise realisation (and, for metacal, one fixnoise field). Stamps are drawn ``32 + 2 margin`` wide
(the estimator's ``MetacalSettings.margin``); estimators without margin see the central 32 x 32.

Sets:
- ``real``: the 50 galaxies of ``../shared/data/cosmos_real_100`` with F814W < 25 (validation only:
  nothing is trained or fitted on them), GalSim reconvolution with the paper's settings; the
  COSMOS noise mask at ``--mask-stage`` (default ``source``: the unlensed galaxy is masked, so a
  stamp is a sheared profile as on the sky). ``--image-mask-noise`` adds rows with the paper's
  mask of every lensed stamp (``image``) at those noise levels, to show what it does to metacal.
- ``parametric``: the embedded default population (natural weights), torch renderer, bins =
  tertiles of the catalogue magnitude.

Rows on the same stamps:
- ``cnn_metacal``: ``est.metacal`` (8-fold symmetrised), ``<R>^-1 <g>``;
- ``cnn_sim``: a simulation-calibrated CNN (``--sim-estimator``, ``predict``);
- ``moments`` / ``ksb`` / ``regauss``: uncalibrated classical estimators;
  ``moments_metacal``: moments through the same metacal operator (the noise cost side by side).
m, c: ``wlshear.metrics.shear_pairs.pair_bias`` (bootstrap over galaxy x orientation units).
sigma: RMS error of the calibrated shear (metacal: ``<R>^-1 g``; others: their own linear fit on
these stamps), on each estimator's usable stamps and (``sigma_common``) on the stamps every
estimator of the set measured (KSB fails on ~10% of the faint real stamps).

    python benchmarks/metacal.py --estimator <metacal run>/estimator_refit.pt --sim-estimator <demo run>/estimator_refit.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from _machine import machine_header
from wlshear.sim.constants import FAST_GSPARAMS as GSP

REPO = Path(__file__).resolve().parents[1]
REAL_DIR = REPO.parent / "shared" / "data" / "cosmos_real_100"
REAL_FILE = "real_galaxy_catalog_26_extension_example.fits"
MAG_EDGES = [0.0, 23.0, 24.0, 25.0]


def renderer(kind: str, noise_scale: float, backend: str, size: int, mask_stage: str):
    from wlshear.sim.augment import Augmentation
    from wlshear.sim.noise import CorrelatedNoise
    from wlshear.sim.render import StampRenderer
    from wlshear.sim.sources import CosmosSource, ParametricSource

    if kind == "real":
        src = CosmosSource(REAL_DIR, file_name=REAL_FILE, use_real=True, exclusion_level="none",
                           mag_range=(0.0, 25.0), gsparams=GSP, mask_stage=mask_stage)
    else:
        src = ParametricSource(gsparams=GSP)
    noise = CorrelatedNoise(None, noise_scale) if noise_scale > 0 else None
    return StampRenderer(src, noise, Augmentation().test_mode(), population="natural", gsparams=GSP,
                         backend=backend, stamp_size=size)


def stamps_for(kind, noise_scale, n_orient, n_gal, shear, seed, backend, size, mask_stage, cache: Path):
    """Rendered design (cached as npz under data_cache/metacal/)."""
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"_{mask_stage}" if kind == "real" else ""
    path = cache / f"{kind}{tag}_{backend}_z{size}_n{noise_scale}_o{n_orient}_g{n_gal}_s{shear}_seed{seed}.npz"
    if path.is_file():
        z = np.load(path)
        return z["stamps"], {k[2:]: z[k] for k in z.files if k.startswith("d_")}, \
            {k[2:]: z[k] for k in z.files if k.startswith("m_")}
    r = renderer(kind, noise_scale, backend, size, mask_stage)
    ids = np.arange(len(r.source.catalog["mag"]))
    if n_gal and n_gal < len(ids):
        ids = np.random.default_rng(seed).choice(ids, n_gal, replace=False)
    batch, design = r.render_shear_pairs(ids, n_orient, shear, seed, progress=True)
    np.savez(path, stamps=batch.stamps, **{f"d_{k}": v for k, v in design.items()},
             **{f"m_{k}": v for k, v in batch.meta.items()})
    return batch.stamps, design, batch.meta


def compared_units(design, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the stamps of a random ``fraction`` of the design's units (whole units, so every
    +-g pair and ring twin stays complete); all stamps for ``fraction >= 1``."""
    unit = np.asarray(design["unit"])
    if fraction >= 1.0:
        return np.ones(len(unit), bool)
    n_units = int(unit.max()) + 1
    chosen = np.random.default_rng(seed + 1).random(n_units) < fraction
    return chosen[unit]


def estimates_for(stamps, design, est, sim_est, baselines, op, args) -> tuple[dict, dict]:
    """name -> (g (N, 2) with NaN rows for failures, R (N, 2, 2) or None, compared (N,) bool); timings.

    The metacal CNN measures every stamp; the simulation-calibrated CNN and the baselines measure
    the ``--baselines-fraction`` of units in ``compared`` (NaN elsewhere, not counted as failures)."""
    from wlshear.calibration.metacal import metacal_measure
    from wlshear.sim.metacal import central

    groups = design["noise_group"]
    everything = np.ones(len(stamps), bool)
    sub = compared_units(design, args.baselines_fraction, args.seed)
    idx = np.flatnonzero(sub)
    small = central(stamps[idx])
    t = time.time()
    mc = est.metacal(stamps, symmetrize=True, seed=args.seed, noise_groups=groups)
    results = {"cnn_metacal": (mc["g"], mc["R"], everything)}
    timing = {"cnn_metacal_s": time.time() - t, "compared_fraction": float(sub.mean())}

    def spread(g, R=None):
        full = np.full((len(stamps), 2), np.nan)
        full[idx] = g
        if R is None:
            return full, None, sub
        fullR = np.full((len(stamps), 2, 2), np.nan)
        fullR[idx] = R
        return full, fullR, sub

    if sim_est is not None:
        results["cnn_sim"] = spread(sim_est.predict(small, symmetrize=True))
    for name, b in baselines.items():
        g, bad = b.estimate(small)
        results[name] = spread(np.where(np.asarray(bad)[:, None], np.nan, g))
        if name in args.metacal_baselines:
            m = metacal_measure(b.estimate, op, stamps[idx], seed=args.seed, noise_groups=groups[idx])
            results[f"{name}_metacal"] = spread(m["g"], m["R"])
    return results, timing


def rows_for(results: dict, design, meta, shear, edges, bin_key) -> dict:
    from wlshear.metrics.shear_pairs import binned_pair_bias, calibrated_sigma, pair_bias

    g_true = np.stack([meta["g1"], meta["g2"]], axis=1)
    usable = {n: np.isfinite(g).all(axis=1) & (np.isfinite(R).all(axis=(1, 2)) if R is not None else True)
              for n, (g, R, _) in results.items()}
    common = np.logical_and.reduce(list(usable.values()))
    out = {}
    for name, (g, R, compared) in results.items():
        row = {"all": pair_bias(g, design, shear, R=R, rng=1),
               "bins": binned_pair_bias(g, design, shear, meta[bin_key], edges, R=R, rng=1)}
        row["sigma"] = calibrated_sigma(g, g_true, R).tolist()
        row["sigma_common"] = calibrated_sigma(g, g_true, R, mask=common).tolist()
        row["fail_frac"] = float(np.mean(~usable[name][compared]))
        row["compared_fraction"] = float(compared.mean())
        out[name] = row
    compared_all = np.logical_and.reduce([c for _, _, c in results.values()])
    out["_common_fraction"] = float(common[compared_all].mean())
    out["_compared_fraction"] = float(compared_all.mean())
    return out


def throughput(est, n: int = 2048) -> dict:
    """Stamps/s of est.metacal on one core, stamps with the operator's margin, default batch."""
    import torch

    size = est.metacal_operator.settings.input_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = np.random.default_rng(0).normal(0, 3.6e-3, (n, size, size)).astype(np.float32)
        est.metacal(x[:256])
        t = time.time()
        est.metacal(x, symmetrize=True)
        sym = n / (time.time() - t)
        t = time.time()
        est.metacal(x, symmetrize=False)
        nosym = n / (time.time() - t)
    finally:
        torch.set_num_threads(threads)
    return {"stamp_side_px": size, "metacal_8fold_stamps_per_s_1core": sym, "metacal_no_sym_stamps_per_s_1core": nosym,
            "load_average_1min": os.getloadavg()[0]}


def relative(arg: str) -> str:
    """A command-line argument that names an existing path, relative to the repository root."""
    p = Path(arg)
    return os.path.relpath(p.resolve(), REPO) if p.is_absolute() and p.exists() else arg


def trained_by(path: str | None, what: str) -> list[str]:
    """The train.py overrides of the run an estimator file comes from (its .hydra/overrides.yaml)."""
    over = Path(path).parent / ".hydra" / "overrides.yaml" if path else None
    if over is None or not over.is_file():
        return []
    import yaml

    return [f"`--{what}` was trained by `python train.py {' '.join(yaml.safe_load(over.read_text()) or [])}`"]


def fmt(v, e):
    return f"{v:+.4f} +- {e:.4f}"


def table(name, res) -> list[str]:
    frac = res.get("_compared_fraction", 1.0)
    lines = [f"### {name}", "", (f"Every estimator but cnn_metacal measured {100 * frac:.0f}% of the units (random, whole "
             "+-g ring units); " if frac < 1 else "") + f"sigma_common: on the {100 * res['_common_fraction']:.1f}% of "
             "those stamps that every estimator measured", "", "| estimator | bin | m1 | m2 | c1 | c2 | sigma1 | sigma2 | sigma_common1 | sigma_common2 | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for est_name, row in res.items():
        if est_name.startswith("_"):
            continue
        for b in [row["all"], *row["bins"]]:
            first = "lo" not in b
            label = "all" if first else f"{b['lo']:.1f}-{b['hi']:.1f} (n={b['n_units']})"
            sig = [f"{v:.4f}" for v in (*row["sigma"], *row["sigma_common"])] if first else [""] * 4
            fail = f"{100 * row['fail_frac']:.1f}%" if first else ""
            lines.append(f"| {est_name} | {label} | {fmt(b['m1'], b['m1_err'])} | {fmt(b['m2'], b['m2_err'])} | "
                         f"{fmt(b['c1'], b['c1_err'])} | {fmt(b['c2'], b['c2_err'])} | {' | '.join(sig)} | {fail} |")
    return lines + [""]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimator", default=None, help="estimator file with metacal settings (required unless --replot)")
    ap.add_argument("--sim-estimator", default=None, help="a simulation-calibrated estimator for comparison")
    ap.add_argument("--noise", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--sets", nargs="+", default=["real", "parametric"], choices=["real", "parametric"])
    ap.add_argument("--n-orient", type=int, nargs="+", default=[400, 200, 100],
                    help="orientations per real galaxy, one value or one per noise level")
    ap.add_argument("--n-gal-param", type=int, nargs="+", default=[3000],
                    help="parametric galaxies, one value or one per noise level")
    ap.add_argument("--n-orient-param", type=int, default=4)
    ap.add_argument("--mask-stage", default="source", choices=["source", "image"])
    ap.add_argument("--image-mask-noise", type=float, nargs="*", default=[1.0],
                    help="noise levels at which the real set is also drawn with the paper's image-stage mask")
    ap.add_argument("--shear", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--baselines", nargs="*", default=["moments", "ksb", "regauss"])
    ap.add_argument("--metacal-baselines", nargs="*", default=["moments"])
    ap.add_argument("--baselines-fraction", type=float, default=1.0,
                    help="fraction of the +-g units (random, whole) that the simulation-calibrated CNN and the "
                         "baselines measure; the metacal CNN measures all (the baselines cost most of the time)")
    ap.add_argument("--reconv-factor", type=float, default=None,
                    help="override the estimator file's reconvolution PSF factor (an ablation; default: the file's)")
    ap.add_argument("--replot", action="store_true", help="only redraw <out>.png from <out>.json")
    ap.add_argument("--out", default="benchmarks/RESULTS_metacal", help="output path stem (relative: to the repository)")
    return ap.parse_args(argv)


def per_level(values: list, name: str, levels: list) -> list:
    """One value per noise level: ``values`` has one entry (repeated) or one per level."""
    if len(values) not in (1, len(levels)):
        raise SystemExit(f"{name} takes one value or one per --noise level ({len(levels)}), got {len(values)}")
    return list(values) if len(values) == len(levels) else list(values) * len(levels)


def jobs(args) -> list[tuple[str, float, int, int, str]]:
    """(set, noise level, orientations, galaxies (0 = all), mask stage) in the order they run."""
    none = [0] * len(args.noise)
    orient = per_level(args.n_orient, "--n-orient", args.noise) if "real" in args.sets else none
    n_gal = per_level(args.n_gal_param, "--n-gal-param", args.noise) if "parametric" in args.sets else none
    if not 0.0 < args.baselines_fraction <= 1.0:
        raise SystemExit(f"--baselines-fraction must be in (0, 1], got {args.baselines_fraction}")
    out = []
    for kind in args.sets:
        for level, n_or, n_g in zip(args.noise, orient, n_gal):
            if kind == "real":
                out.append(("real", level, n_or, 0, args.mask_stage))
                if level in args.image_mask_noise and args.mask_stage != "image":
                    out.append(("real", level, n_or, 0, "image"))
            else:
                out.append(("parametric", level, args.n_orient_param, n_g, ""))
    return out


def main(argv=None) -> int:
    args = parse(argv)
    if args.replot:
        plot(json.loads((REPO / (args.out + ".json")).read_text()), REPO / (args.out + ".png"))
        return 0
    if args.estimator is None:
        raise SystemExit("benchmarks/metacal.py: --estimator <metacal run>/estimator_refit.pt is required")
    import wlshear
    from wlshear.sim.metacal import MetacalOperator, MetacalSettings
    from wlshear.tasks.estimators import build_baselines
    from wlshear.utils.hydra import compose_config

    est = wlshear.load_estimator(args.estimator)
    sim_est = wlshear.load_estimator(args.sim_estimator) if args.sim_estimator else None
    base_settings = est.metacal_operator.settings
    if args.reconv_factor is not None:
        base_settings = MetacalSettings.from_dict({**base_settings.to_dict(), "reconv_factor": args.reconv_factor})
    size = base_settings.input_size
    report = {"estimator": relative(args.estimator),
              "sim_estimator": args.sim_estimator and relative(args.sim_estimator), "shear": args.shear,
              "metacal_settings": base_settings.to_dict(), "sets": {}}
    report["throughput"] = throughput(est)
    print(json.dumps(report["throughput"]), flush=True)
    md = ["# Metacalibration benchmark", "", "```", machine_header(), "```", "",
          f"Command: `python benchmarks/metacal.py {' '.join(relative(a) for a in (argv if argv is not None else sys.argv[1:]))}`",
          "", *trained_by(args.estimator, "estimator"), *trained_by(args.sim_estimator, "sim-estimator"), "",
          f"Throughput (1 core, {size} x {size} stamps, batch 64): "
          f"{report['throughput']['metacal_8fold_stamps_per_s_1core']:.0f} stamps/s with the 8-fold average, "
          f"{report['throughput']['metacal_no_sym_stamps_per_s_1core']:.0f} without (machine load average "
          f"{report['throughput']['load_average_1min']:.1f} on 2 cores while measured)", ""]
    baselines = build_baselines(compose_config("evaluate", [f"baselines=[{','.join(args.baselines)}]",
                                                          f"paths.root_dir={REPO}"]).baselines)[0] \
        if args.baselines else {}
    for kind, level, n_orient, n_gal, stage in jobs(args):
        if kind == "real" and not REAL_DIR.is_dir():
            print(f"skipping real galaxies: {REAL_DIR} not found", flush=True)
            continue
        settings = MetacalSettings.from_dict({**base_settings.to_dict(), "noise_scale": level * 1.0})
        est.set_metacal(settings)
        t = time.time()
        backend = "galsim" if kind == "real" else "torch"
        stamps, design, meta = stamps_for(kind, level, n_orient, n_gal, args.shear, args.seed, backend, size,
                                          stage or "source", REPO / "data_cache" / "metacal")
        t_render = time.time() - t
        results, timing = estimates_for(stamps, design, est, sim_est, baselines, MetacalOperator(settings), args)
        if kind == "real":
            edges, bin_key, label = MAG_EDGES, "mag_source", f"real galaxies, {stage}-stage mask"
        else:
            mags = meta["mag"]
            edges, bin_key, label = [0.0, *np.percentile(mags, [100 / 3, 200 / 3]), 99.0], "mag", "parametric"
        res = rows_for(results, design, meta, args.shear, edges, bin_key)
        key = f"{kind}{'_' + stage if stage else ''}_noise{level}"
        report["sets"][key] = {"n_stamps": len(stamps), "n_orient": n_orient, "render_s": t_render, **timing,
                               "rows": res}
        md += table(f"{label}, noise x{level} ({len(stamps)} stamps, {n_orient} orientations per galaxy)", res)
        for name, row in res.items():
            if name.startswith("_"):
                continue
            a = row["all"]
            print(f"{key:28s} {name:16s} m1={fmt(a['m1'], a['m1_err'])} m2={fmt(a['m2'], a['m2_err'])} "
                  f"c1={a['c1']:+.5f} c2={a['c2']:+.5f} sigma={row['sigma'][0]:.4f},{row['sigma'][1]:.4f} "
                  + " bins m1: " + " ".join(f"{b['m1']:+.3f}+-{b['m1_err']:.3f}" for b in row["bins"])
                  + " m2: " + " ".join(f"{b['m2']:+.3f}+-{b['m2_err']:.3f}" for b in row["bins"]), flush=True)
        (REPO / (args.out + ".json")).write_text(json.dumps(report, indent=1, default=float))
        (REPO / (args.out + ".md")).write_text("\n".join(md) + "\n")
    plot(report, REPO / (args.out + ".png"))
    return 0


def plot(report: dict, path: Path) -> None:
    """m1, m2 per F814W bin of the metacal CNN on the real galaxies, every noise level and mask stage
    (the open bin below 23 drawn at 22.5); ``python benchmarks/metacal.py --replot`` redraws it from
    the JSON."""
    from wlshear.metrics.plots import plot_bin_bias

    rows = []
    for key, res in report["sets"].items():
        if key.startswith("real") and "cnn_metacal" in res["rows"]:
            rows += [{**b, "lo": max(b["lo"], b["hi"] - 1.0), "estimator": key.replace("real_", "cnn_metacal ")}
                     for b in res["rows"]["cnn_metacal"]["bins"]]
    if rows:
        plot_bin_bias(rows, path, title="real COSMOS galaxies (validation only): CNN through metacal, m per F814W bin")


if __name__ == "__main__":
    raise SystemExit(main())
