"""Metacalibration benchmark (issue #13): per-magnitude-bin m, c on real galaxies it never saw.

Design: the +-g common-noise design with 90-degree ring twins
(``StampRenderer.render_shear_pairs``): every galaxy at ``--n-orient`` random orientations, each
orientation and its ring twin under (+-g0, 0) and (0, +-g0), the two opposite shears sharing one
noise realisation. Real galaxies: the 50 of ``../shared/data/cosmos_real_100`` with F814W < 25
(validation only: nothing is trained or fitted on them), rendered by GalSim reconvolution with the
paper's settings. Parametric: the embedded default population (natural weights), torch renderer.

Rows on the same stamps:
- ``cnn_metacal``: ``est.metacal`` (8-fold symmetrised), ``<R>^-1 <g>``;
- ``cnn_sim``: a simulation-calibrated CNN (``--sim-estimator``, ``predict``);
- ``moments`` / ``ksb``: uncalibrated classical estimators; ``moments_metacal``: moments through
  the same metacal operator (the noise cost side by side).
m, c: ``wlshear.metrics.shear_pairs.pair_bias`` (bootstrap over galaxy x orientation units);
sigma: RMS error of the calibrated shear (metacal: ``<R>^-1 g``; others: their own linear fit).

    python benchmarks/metacal.py --estimator <run>/estimator_refit.pt --sim-estimator <demo run>/estimator_refit.pt
"""

from __future__ import annotations

import argparse
import json
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


def renderer(kind: str, noise_scale: float, backend: str):
    from wlshear.sim.augment import Augmentation
    from wlshear.sim.noise import CorrelatedNoise
    from wlshear.sim.render import StampRenderer
    from wlshear.sim.sources import ParametricSource
    from wlshear.sim.sources import CosmosSource

    if kind == "real":
        src = CosmosSource(REAL_DIR, file_name=REAL_FILE, use_real=True, exclusion_level="none",
                           mag_range=(0.0, 25.0), gsparams=GSP)
    else:
        src = ParametricSource(gsparams=GSP)
    noise = CorrelatedNoise(None, noise_scale) if noise_scale > 0 else None
    return StampRenderer(src, noise, Augmentation().test_mode(), population="natural", gsparams=GSP,
                         backend=backend)


def stamps_for(kind, noise_scale, n_orient, n_gal, shear, seed, backend, cache: Path):
    """Rendered design (cached as npz under data_cache/metacal/)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{kind}_{backend}_n{noise_scale}_o{n_orient}_g{n_gal}_s{shear}_seed{seed}.npz"
    if path.is_file():
        z = np.load(path)
        return z["stamps"], {k[2:]: z[k] for k in z.files if k.startswith("d_")}, \
            {k[2:]: z[k] for k in z.files if k.startswith("m_")}
    r = renderer(kind, noise_scale, backend)
    ids = np.arange(len(r.source.catalog["mag"]))
    if n_gal and n_gal < len(ids):
        ids = np.random.default_rng(seed).choice(ids, n_gal, replace=False)
    batch, design = r.render_shear_pairs(ids, n_orient, shear, seed, progress=True)
    np.savez(path, stamps=batch.stamps, **{f"d_{k}": v for k, v in design.items()},
             **{f"m_{k}": v for k, v in batch.meta.items()})
    return batch.stamps, design, batch.meta


def rows_for(stamps, design, meta, shear, est, sim_est, baselines, op, args):
    from wlshear.calibration.metacal import metacal_measure
    from wlshear.metrics.shear_pairs import binned_pair_bias, calibrated_sigma, pair_bias

    g_true = np.stack([meta["g1"], meta["g2"]], axis=1)
    results = {}
    t = time.time()
    groups = design["noise_group"] if "noise_group" in design else np.arange(len(stamps)) // 2
    mc = est.metacal(stamps, symmetrize=True, seed=args.seed, noise_groups=groups)
    results["cnn_metacal"] = (mc["g"], mc["R"])
    timing = {"cnn_metacal_s": time.time() - t}
    if sim_est is not None:
        results["cnn_sim"] = (sim_est.predict(stamps, symmetrize=True), None)
    for name, b in baselines.items():
        g, bad = b.estimate(stamps)
        results[name] = (np.where(bad[:, None], np.nan, g), None)
        if name in args.metacal_baselines:
            m = metacal_measure(b.estimate, op, stamps, seed=args.seed, noise_groups=groups)
            results[f"{name}_metacal"] = (m["g"], m["R"])
    mags = meta["mag_source"]
    out = {}
    for name, (g, R) in results.items():
        row = {"all": pair_bias(g, design, shear, R=R, rng=1),
               "bins": binned_pair_bias(g, design, shear, mags, MAG_EDGES, R=R, rng=1)}
        row["sigma"] = calibrated_sigma(g, g_true, R).tolist()
        row["fail_frac"] = float(np.mean(~np.isfinite(g).all(axis=1)))
        out[name] = row
    return out, timing


def throughput(est, n: int = 2048) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = np.random.default_rng(0).normal(0, 3.6e-3, (n, 32, 32)).astype(np.float32)
        est.metacal(x[:256])
        t = time.time()
        est.metacal(x, symmetrize=True)
        sym = n / (time.time() - t)
        t = time.time()
        est.metacal(x, symmetrize=False)
        nosym = n / (time.time() - t)
    finally:
        torch.set_num_threads(threads)
    return {"metacal_8fold_stamps_per_s_1core": sym, "metacal_no_sym_stamps_per_s_1core": nosym}


def fmt(v, e):
    return f"{v:+.4f} +- {e:.4f}"


def table(name, res) -> list[str]:
    lines = [f"### {name}", "", "| estimator | bin | m1 | m2 | c1 | c2 | sigma1 | sigma2 |", "|---|---|---|---|---|---|---|---|"]
    for est_name, row in res.items():
        for b in [row["all"], *row["bins"]]:
            label = "all" if "lo" not in b else f"{b['lo']:.0f}-{b['hi']:.0f} (n={b['n_units']})"
            sig = row["sigma"] if "lo" not in b else ["", ""]
            s1 = f"{sig[0]:.4f}" if sig[0] != "" else ""
            s2 = f"{sig[1]:.4f}" if sig[1] != "" else ""
            lines.append(f"| {est_name} | {label} | {fmt(b['m1'], b['m1_err'])} | {fmt(b['m2'], b['m2_err'])} | "
                         f"{fmt(b['c1'], b['c1_err'])} | {fmt(b['c2'], b['c2_err'])} | {s1} | {s2} |")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimator", required=True, help="estimator file with metacal settings")
    ap.add_argument("--sim-estimator", default=None, help="a simulation-calibrated estimator for comparison")
    ap.add_argument("--noise", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--sets", nargs="+", default=["real", "parametric"], choices=["real", "parametric"])
    ap.add_argument("--n-orient", type=int, default=100, help="orientations per real galaxy")
    ap.add_argument("--n-gal-param", type=int, default=2000, help="parametric galaxies")
    ap.add_argument("--n-orient-param", type=int, default=2)
    ap.add_argument("--shear", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--baselines", nargs="*", default=["moments", "ksb"])
    ap.add_argument("--metacal-baselines", nargs="*", default=["moments"])
    ap.add_argument("--out", default="benchmarks/RESULTS_metacal", help="output path stem (relative: to the repository)")
    args = ap.parse_args(argv)

    import wlshear
    from wlshear.tasks.estimators import build_baselines
    from wlshear.utils.hydra import compose_config
    from wlshear.sim.metacal import MetacalSettings

    est = wlshear.load_estimator(args.estimator)
    sim_est = wlshear.load_estimator(args.sim_estimator) if args.sim_estimator else None
    base_settings = est.metacal_operator.settings
    report = {"estimator": args.estimator, "sim_estimator": args.sim_estimator, "shear": args.shear,
              "metacal_settings": base_settings.to_dict(), "sets": {}}
    report["throughput"] = throughput(est)
    print(json.dumps(report["throughput"]), flush=True)
    md = ["# Metacalibration benchmark", "", "```", machine_header(), "```", "",
          f"Command: `python benchmarks/metacal.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
          f"Throughput (1 core): {report['throughput']}", ""]
    for kind in args.sets:
        if kind == "real" and not REAL_DIR.is_dir():
            print(f"skipping real galaxies: {REAL_DIR} not found", flush=True)
            continue
        for level in args.noise:
            settings = MetacalSettings.from_dict({**base_settings.to_dict(), "noise_scale": level * 1.0})
            est.set_metacal(settings)
            from wlshear.sim.metacal import MetacalOperator

            op = MetacalOperator(settings)
            baselines = build_baselines(compose_config("evaluate", [f"baselines=[{','.join(args.baselines)}]",
                                                              f"paths.root_dir={REPO}"]).baselines)[0]
            n_orient = args.n_orient if kind == "real" else args.n_orient_param
            n_gal = 0 if kind == "real" else args.n_gal_param
            backend = "galsim" if kind == "real" else "torch"
            t = time.time()
            stamps, design, meta = stamps_for(kind, level, n_orient, n_gal, args.shear, args.seed, backend,
                                              REPO / "data_cache" / "metacal")
            t_render = time.time() - t
            res, timing = rows_for(stamps, design, meta, args.shear, est, sim_est, baselines, op, args)
            key = f"{kind}_noise{level}"
            report["sets"][key] = {"n_stamps": len(stamps), "render_s": t_render, **timing, "rows": res}
            md += table(f"{kind} galaxies, noise x{level} ({len(stamps)} stamps)", res)
            for name, row in res.items():
                a = row["all"]
                print(f"{key:20s} {name:16s} m1={fmt(a['m1'], a['m1_err'])} m2={fmt(a['m2'], a['m2_err'])} "
                      f"c1={a['c1']:+.5f} c2={a['c2']:+.5f} sigma={row['sigma'][0]:.4f},{row['sigma'][1]:.4f} "
                      + " bins m1: " + " ".join(f"{b['m1']:+.3f}+-{b['m1_err']:.3f}" for b in row["bins"])
                      + " m2: " + " ".join(f"{b['m2']:+.3f}+-{b['m2_err']:.3f}" for b in row["bins"]), flush=True)
            (REPO / (args.out + ".json")).write_text(json.dumps(report, indent=1, default=float))
            (REPO / (args.out + ".md")).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
