"""Fit a calibration surface for a trained estimator on ring-pair simulations and save a new
estimator file that carries it.

    python -m wlshear.calibration.fit_surface --estimator outputs/train/runs/<stamp>/estimator_refit.pt \\
        --out outputs/train/runs/<stamp>/estimator_surface.pt [--n 20000] [--basis poly --degree 2] \\
        [--features mag log10_hlr] [data overrides, e.g. data.noise_scale=0.5 data/source=cosmos]

The stamps come from the project's renderer with the ``data`` config group (``conf/fit_surface.yaml``;
evaluation mode: rotation + mirror, ``eval_population``) as 90-degree ring pairs, cached in
``paths.cache_dir``. The estimator's (globally calibrated, symmetrised) shears and the observables
measured on the stamps (``measure_observables``) give the surface (:func:`fit_surface`); the
output estimator applies it in ``predict``. A JSON copy of the surface and a per-magnitude-bin
table (before / after, on the fitting set itself) are written next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path


from wlshear.calibration.surface import FEATURES, fit_surface

log = logging.getLogger(__name__)


def compose_data(overrides: list[str]):
    """The ``data`` config (Hydra compose of conf/fit_surface.yaml with ``overrides``)."""
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    ov = list(overrides)
    if not any(o.startswith("paths.root_dir=") for o in ov) and "PROJECT_ROOT" not in os.environ:
        ov.append(f"paths.root_dir={Path.cwd()}")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("fit_surface.yaml", overrides=ov)


def binned_table(g_true, g_est, mag, pair_ids, bins: int = 5) -> list[dict]:
    """m1, m2 (ring-pair fit) per quantile bin of the pair-mean magnitude."""
    from wlshear.calibration.surface import pair_means
    from wlshear.metrics.binned import bin_edges
    from wlshear.metrics.bias import fit_bias

    pm, inv = pair_means(mag, pair_ids)
    x = pm[inv]
    edges = bin_edges(x, bins)
    rows = []
    for b in range(bins):
        sel = (x >= edges[b]) & ((x <= edges[b + 1]) if b == bins - 1 else (x < edges[b + 1]))
        f = fit_bias(g_true[sel], g_est[sel], pair_ids=pair_ids[sel])
        rows.append({"mag_lo": float(edges[b]), "mag_hi": float(edges[b + 1]), "n_pairs": int(f.n),
                     "m1": float(f.m[0]), "m1_err": float(f.m_err[0]), "m2": float(f.m[1]), "m2_err": float(f.m_err[1])})
    return rows


def main(argv=None) -> int:
    from wlshear.utils.validate import FIT_SURFACE_RULES, Int, cli_type, validate_config

    ap = argparse.ArgumentParser(prog="python -m wlshear.calibration.fit_surface",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimator", required=True, help="input estimator file (estimator_refit.pt)")
    ap.add_argument("--out", required=True, help="output estimator file with the surface")
    ap.add_argument("--n", type=cli_type(Int(40)), default=20000, help="stamps (ring pairs: n/2 galaxies)")
    ap.add_argument("--seed", type=cli_type(Int(0)), default=8001, help="seed of the fitting set")
    ap.add_argument("--features", nargs="+", default=["mag", "log10_hlr"], choices=sorted(FEATURES))
    ap.add_argument("--basis", default="poly", choices=["poly", "linear"])
    ap.add_argument("--degree", type=cli_type(Int(0, 10)), default=3, help="total polynomial degree (basis poly)")
    ap.add_argument("--stages", type=cli_type(Int(1, 10)), default=2, help="successive surface stages (see wlshear.calibration.surface)")
    ap.add_argument("--n-knots", type=cli_type(Int(2, 100)), default=4, help="knots per feature (basis linear)")
    ap.add_argument("--no-symmetrize", action="store_true", help="fit on non-symmetrised predictions")
    ap.add_argument("--workers", type=cli_type(Int(0, 256)), default=0, help="rendering worker processes")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the data config (data.*, data/source=...)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.n < 40 or args.n % 2:
        ap.error(f"--n must be even and >= 40 (ring pairs), got {args.n}")

    from hydra.utils import instantiate

    from wlshear.data.datasets import CachedStampSet
    from wlshear.models.estimator import load_estimator

    cfg = compose_data(args.overrides)
    validate_config(cfg, FIT_SURFACE_RULES, "fit_surface data config")
    est = load_estimator(args.estimator)
    if est.surface is not None:
        log.warning("%s already carries a calibration surface; fitting a new one on its surface-free output",
                    args.estimator)
    dm = instantiate(cfg.data)
    ss = CachedStampSet(dm.eval_renderer, args.n, args.seed, cache_dir=dm.cache_dir, ring=True,
                        name="surface", workers=args.workers, max_failure_fraction=dm.hparams.max_failure_fraction)
    b = ss.batch
    sym = not args.no_symmetrize
    g, failed = est.predict_with_flags(b.stamps, symmetrize=sym, apply_surface=False, batch_size=256)
    from wlshear.observables import measure_observables

    obs = measure_observables(b.stamps)
    pid = b.meta["pair_id"]
    surf = fit_surface(b.shear, g, obs, pair_ids=pid, failed=failed, features=args.features, basis=args.basis,
                       degree=args.degree, n_knots=args.n_knots, n_stages=args.stages)
    surf.diagnostics.update(symmetrize=sym, n_stamps=len(b), seed=args.seed, source_estimator=str(args.estimator),
                            data_overrides=list(args.overrides))
    g_cal = surf.apply(g, obs)
    before = binned_table(b.shear, g, obs["mag"], pid)
    after = binned_table(b.shear, g_cal, obs["mag"], pid)
    est.set_surface(surf)
    est.metadata = {**est.metadata, "calibration_surface": {"fitted_on": f"{len(b)} ring-pair stamps, seed {args.seed}",
                                                            "source_estimator": str(args.estimator)}}
    out = est.save(args.out)
    surf.save(Path(out).with_suffix(".surface.json"))
    table = {"before": before, "after_in_sample": after, "surface": surf.diagnostics}
    Path(out).with_suffix(".surface_bins.json").write_text(json.dumps(table, indent=1))
    print(f"wrote {out} (surface: {surf}); per magnitude bin, in-sample m1/m2 before -> after:")
    for r0, r1 in zip(before, after):
        print(f"  mag {r0['mag_lo']:.2f}-{r0['mag_hi']:.2f}: m1 {r0['m1']:+.3f}±{r0['m1_err']:.3f} -> "
              f"{r1['m1']:+.3f}   m2 {r0['m2']:+.3f}±{r0['m2_err']:.3f} -> {r1['m2']:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
