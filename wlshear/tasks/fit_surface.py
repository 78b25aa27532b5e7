"""Fit a calibration surface for a trained estimator on ring-pair simulations and save a new
estimator file that carries it.

    python -m wlshear.tasks.fit_surface estimator=outputs/train/runs/<stamp>/estimator_refit.pt \\
        out=outputs/train/runs/<stamp>/estimator_surface.pt [surface.n=20000] [surface.basis=linear] \\
        [surface.features='[mag,log10_hlr]'] [data.noise_scale=0.5] [data/source=cosmos]

Composes ``conf/fit_surface.yaml``. The stamps come from the project's renderer with the ``data``
config group (evaluation mode: rotation + mirror, ``eval_population``) as 90-degree ring pairs,
cached in ``paths.cache_dir``. The estimator's (globally calibrated, symmetrised) shears and the
observables measured on the stamps (``wlshear.observables.measure_observables``) give the surface
(:func:`wlshear.calibration.fit_surface`); the output estimator applies it in ``predict``. A JSON
copy of the surface and a per-magnitude-bin table (before / after, on the fitting set itself) are
written next to ``out``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from wlshear.calibration.surface import fit_surface, pair_means
from wlshear.data.datasets import CachedStampSet
from wlshear.metrics.bias import fit_bias
from wlshear.metrics.binned import bin_edges
from wlshear.models.estimator import load_estimator
from wlshear.observables import measure_observables
from wlshear.tasks.relations import FIT_SURFACE_RELATIONS
from wlshear.tasks.rules import FIT_SURFACE_RULES
from wlshear.utils.hydra import run_cli

log = logging.getLogger(__name__)


def binned_table(g_true, g_est, mag, pair_ids, bins: int = 5) -> list[dict]:
    """m1, m2 (ring-pair fit) per quantile bin of the pair-mean magnitude."""
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


def surface_fit(cfg: DictConfig, data_overrides=()) -> int:
    """Fit and write the surface; ``data_overrides`` (the command line's ``data`` arguments) are
    recorded in its diagnostics."""
    s = cfg.surface
    est = load_estimator(cfg.estimator)
    if est.surface is not None:
        log.warning("%s already carries a calibration surface; fitting a new one on its surface-free output",
                    cfg.estimator)
    dm = instantiate(cfg.data)
    ss = CachedStampSet(dm.fit_renderer, int(s.n), int(s.seed), cache_dir=dm.cache_dir, ring=True, name="surface",
                        workers=int(s.workers), max_failure_fraction=dm.hparams.max_failure_fraction)
    b = ss.batch
    g, failed = est.predict_with_flags(b.stamps, symmetrize=bool(s.symmetrize), apply_surface=False, batch_size=256)
    obs = measure_observables(b.stamps)
    pid = b.meta["pair_id"]
    surf = fit_surface(b.shear, g, obs, pair_ids=pid, failed=failed, features=list(s.features), basis=str(s.basis),
                       degree=int(s.degree), n_knots=int(s.n_knots), n_stages=int(s.stages))
    surf.diagnostics.update(symmetrize=bool(s.symmetrize), n_stamps=len(b), seed=int(s.seed),
                            source_estimator=str(cfg.estimator), data_overrides=list(data_overrides))
    g_cal = surf.apply(g, obs)
    before = binned_table(b.shear, g, obs["mag"], pid)
    after = binned_table(b.shear, g_cal, obs["mag"], pid)
    est.set_surface(surf)
    est.metadata = {**est.metadata, "calibration_surface": {"fitted_on": f"{len(b)} ring-pair stamps, seed {s.seed}",
                                                            "source_estimator": str(cfg.estimator)}}
    out = est.save(cfg.out)
    surf.save(Path(out).with_suffix(".surface.json"))
    table = {"before": before, "after_in_sample": after, "surface": surf.diagnostics}
    Path(out).with_suffix(".surface_bins.json").write_text(json.dumps(table, indent=1))
    print(f"wrote {out} (surface: {surf}); per magnitude bin, in-sample m1/m2 before -> after:")
    for r0, r1 in zip(before, after):
        print(f"  mag {r0['mag_lo']:.2f}-{r0['mag_hi']:.2f}: m1 {r0['m1']:+.3f}±{r0['m1_err']:.3f} -> "
              f"{r1['m1']:+.3f}   m2 {r0['m2']:+.3f}±{r0['m2_err']:.3f} -> {r1['m2']:+.3f}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    data_overrides = [a for a in argv if a.startswith(("data.", "data/", "+data"))]
    example = "python -m wlshear.tasks.fit_surface estimator=<run>/estimator_refit.pt out=<run>/estimator_surface.pt"
    return run_cli("fit_surface", lambda cfg: surface_fit(cfg, data_overrides), FIT_SURFACE_RULES,
                   FIT_SURFACE_RELATIONS, argv, example=example, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
