"""Fixed, cached ring-pair stamp sets for benchmarks/conditional_bias.py (issue #8).

Same settings as the project's evaluation sets (``conf/data/default.yaml``): test-mode
augmentation (rotation + mirror), natural population, full CLASH correlated noise, fast GalSim
gsparams. Sets are cached under ``data_cache/`` by ``CachedStampSet`` (hash of the renderer
description, n, seed, ring), so the benchmark and a re-run reuse them.

    python benchmarks/condbias_sets.py --n-cal 16000 --n-test 16000 --n-real 4000 --workers 2
    python benchmarks/condbias_sets.py --backend torch --n-cal 300000 --n-test 300000 --workers 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GSP = dict(minimum_fft_size=64, folding_threshold=1e-2, maxk_threshold=3e-3)
CACHE = REPO / "data_cache"
REAL_DIR = REPO.parent / "shared" / "data" / "cosmos_real_100"
REAL_FILE = "real_galaxy_catalog_26_extension_example.fits"
#: large parametric sets drawn with the batched torch renderer (issue #8 target study): key -> (seed, name)
TORCH_SETS = {"cal": (8101, "condbias_cal_torch"), "test": (8102, "condbias_test_torch"),
              "test2": (8104, "condbias_test2_torch"), "test3": (8105, "condbias_test3_torch")}


def parametric_renderer(noise_scale: float = 1.0, backend: str = "galsim"):
    from wlshear.sim.augment import Augmentation
    from wlshear.sim.noise import CorrelatedNoise
    from wlshear.sim.render import StampRenderer, build_source

    src = build_source("parametric", gsparams=GSP)
    return StampRenderer(src, CorrelatedNoise(None, noise_scale), Augmentation().test_mode(),
                         population="natural", gsparams=GSP, backend=backend)


def real_renderer(mag_max: float = 25.0, noise_scale: float = 1.0, backend: str = "galsim"):
    """The real COSMOS galaxies of cosmos_real_100 with F814W < mag_max (never trained on)."""
    from wlshear.sim.augment import Augmentation
    from wlshear.sim.noise import CorrelatedNoise
    from wlshear.sim.render import StampRenderer
    from wlshear.sim.sources import CosmosSource

    src = CosmosSource(REAL_DIR, file_name=REAL_FILE, use_real=True, exclusion_level="none",
                       mag_range=(0.0, mag_max), gsparams=GSP)
    return StampRenderer(src, CorrelatedNoise(None, noise_scale), Augmentation().test_mode(),
                         population="natural", gsparams=GSP, backend=backend)


def cached(renderer, n: int, seed: int, name: str, workers: int = 0):
    from wlshear.data.datasets import CachedStampSet

    return CachedStampSet(renderer, n, seed, cache_dir=CACHE, ring=True, name=name, workers=workers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-cal", type=int, default=16000)
    ap.add_argument("--n-test", type=int, default=16000)
    ap.add_argument("--n-real", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="galsim", choices=["galsim", "torch"],
                    help="renderer backend; 'torch' sets get their own names and seeds (see TORCH_SETS)")
    ap.add_argument("--extra-test", type=int, default=0, choices=[0, 1, 2],
                    help="torch only: this many further independent test sets of --n-test stamps (test2, test3)")
    args = ap.parse_args(argv)
    if args.backend == "torch":
        keys = [("test", args.n_test), ("cal", args.n_cal)]
        keys += [(f"test{j + 2}", args.n_test) for j in range(args.extra_test)]
        for key, n in keys:
            if n:
                seed, name = TORCH_SETS[key]
                s = cached(parametric_renderer(backend="torch"), n, seed, name, args.workers)
                print(key, len(s), s.path, flush=True)
        return 0
    if args.n_real:
        s = cached(real_renderer(), args.n_real, 8003, "condbias_real", args.workers)
        print("real", len(s), s.path, flush=True)
    if args.n_test:
        s = cached(parametric_renderer(), args.n_test, 8002, "condbias_test", args.workers)
        print("test", len(s), s.path, flush=True)
    if args.n_cal:
        s = cached(parametric_renderer(), args.n_cal, 8001, "condbias_cal", args.workers)
        print("cal", len(s), s.path, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
