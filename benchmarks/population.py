"""The structured population's shape distributions against the COSMOS fits it was tuned to.

    python benchmarks/population.py [--source structured] [--out benchmarks/RESULTS_population.png]

Builds the source of ``conf/data/source/<source>.yaml`` (the training configuration), reads the
COSMOS bulge+disk fits of ``../shared/data/cosmos_example_23.5`` and the single-Sersic fits of
``../shared/data/cosmos_sersic_300`` (tuning data; cosmos_real_100 is never used here), prints the
medians side by side and writes the histogram plot. The COSMOS fits are of bright (F814W < 23.5)
galaxies with their own fit noise: the comparison is a sanity check of each distribution's
location and width, not a fit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from hydra.utils import instantiate

from wlshear.metrics.plots import plot_population
from wlshear.sim.structured import cosmos_fit_shapes, population_shapes
from wlshear.utils.hydra import compose_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="structured")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS_population.png"))
    args = ap.parse_args(argv)
    fits = SHARED / "cosmos_example_23.5" / "real_galaxy_catalog_23.5_example_fits.fits"
    table = SHARED / "cosmos_sersic_300" / "cosmos_sersics_sample_N300_cleaned.asc"
    if not fits.exists():
        raise SystemExit(f"needs {fits} (the project's ../shared data)")
    cfg = compose_config("train", [f"data/source={args.source}"])
    src = instantiate(cfg.data.source)
    ours = population_shapes(src)
    ref = cosmos_fit_shapes(fits, table if table.exists() else None)
    print(f"{'statistic':<18} {'ours median':>12} {'COSMOS median':>14} {'ours N':>8} {'COSMOS N':>9}")
    for k in ours:
        a, b = np.asarray(ours[k], float), np.asarray(ref[k], float)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        print(f"{k:<18} {np.median(a):>12.3f} {np.median(b):>14.3f} {len(a):>8d} {len(b):>9d}")
    print("wrote", plot_population(ours, ref, args.out, labels=(args.source, "COSMOS fits")))


if __name__ == "__main__":
    main()
