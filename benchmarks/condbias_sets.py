"""Fixed, cached ring-pair stamp sets and shared helpers for benchmarks/conditional_bias.py and
benchmarks/condbias_target.py (issue #8).

Same settings as the project's evaluation sets (``conf/data/default.yaml``): test-mode
augmentation (rotation + mirror), natural population, full CLASH correlated noise, fast GalSim
gsparams. Sets are cached under ``data_cache/`` by ``CachedStampSet`` (hash of the renderer
description, n, seed, ring), so the benchmark and a re-run reuse them.

    python benchmarks/condbias_sets.py --n-cal 16000 --n-test 16000 --n-real 4000 --workers 2
    python benchmarks/condbias_sets.py --backend torch --n-cal 300000 --n-test 300000 --workers 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from wlshear.data.datasets import CachedStampSet
from wlshear.metrics.bias import bias_summary, fit_bias
from wlshear.sim.augment import Augmentation
from wlshear.sim.constants import FAST_GSPARAMS
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.render import StampRenderer
from wlshear.sim.sources import CosmosSource, ParametricSource

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "data_cache"
REAL_DIR = REPO.parent / "shared" / "data" / "cosmos_real_100"
REAL_FILE = "real_galaxy_catalog_26_extension_example.fits"
#: large parametric sets drawn with the batched torch renderer (issue #8 target study): key -> (seed, name)
TORCH_SETS = {"cal": (8101, "condbias_cal_torch"), "test": (8102, "condbias_test_torch"),
              "test2": (8104, "condbias_test2_torch"), "test3": (8105, "condbias_test3_torch")}
#: no calibration (the estimators' outputs as delivered)
IDENTITY = {"m1": 0.0, "c1": 0.0, "m2": 0.0, "c2": 0.0}


def parametric_renderer(noise_scale: float = 1.0, backend: str = "galsim"):
    return StampRenderer(ParametricSource(gsparams=FAST_GSPARAMS), CorrelatedNoise(None, noise_scale),
                         Augmentation().test_mode(), population="natural", gsparams=FAST_GSPARAMS, backend=backend)


def real_renderer(mag_max: float = 25.0, noise_scale: float = 1.0, backend: str = "galsim"):
    """The real COSMOS galaxies of cosmos_real_100 with F814W < mag_max (never trained on)."""
    src = CosmosSource(REAL_DIR, file_name=REAL_FILE, use_real=True, exclusion_level="none",
                       mag_range=(0.0, mag_max), gsparams=FAST_GSPARAMS)
    return StampRenderer(src, CorrelatedNoise(None, noise_scale), Augmentation().test_mode(),
                         population="natural", gsparams=FAST_GSPARAMS, backend=backend)


def cached(renderer, n: int, seed: int, name: str, workers: int = 0) -> CachedStampSet:
    return CachedStampSet(renderer, n, seed, cache_dir=CACHE, ring=True, name=name, workers=workers)


def rel(path) -> str:
    """``path`` relative to the repository root (results files never name a machine's absolute paths)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(Path(path))


def newest_estimator() -> Path | None:
    c = sorted((REPO / "outputs" / "train" / "runs").glob("*/estimator_refit.pt"), key=lambda p: p.stat().st_mtime)
    return c[-1] if c else None


def global_calibration(g_true, g, pair_ids) -> dict:
    """One (m, c) per component fitted on ring pairs: the bias of ``g`` as a calibration."""
    return fit_bias(g_true, g, pair_ids=pair_ids).calibration()


def overall(g_true, estimates: dict, pair_ids) -> dict:
    """Whole-set m, c (ring-pair fit), sigma (recalibrated) and sigma_delivered (RMS of the estimate
    minus the truth, as delivered) of name -> (g, failed)."""
    out = {}
    keys = ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err", "sigma1", "sigma2", "n_failed")
    for n, (g, f) in estimates.items():
        s = bias_summary(g_true, g, f, pair_ids)
        ok = ~f & np.all(np.isfinite(g), 1)
        out[n] = {k: s[k] for k in keys} | {"sigma_delivered": float(np.sqrt(np.mean((g[ok] - g_true[ok]) ** 2)))}
    return out


def rows_of(rows: list[dict], name: str, observable: str) -> list[dict]:
    return [r for r in rows if r["estimator"] == name and r["observable"] == observable]


def study_parser(doc: str, n_cal: int, n_test: int) -> argparse.ArgumentParser:
    """The options both conditional-bias studies take: estimator, set sizes, workers, output stem."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimator", default=None, help="default: the newest outputs/train/runs/*/estimator_refit.pt")
    ap.add_argument("--n-cal", type=int, default=n_cal)
    ap.add_argument("--n-test", type=int, default=n_test)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/RESULTS_condbias", help="output path stem (relative to the repository)")
    return ap


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
        keys = [("test", args.n_test), ("cal", args.n_cal)] + [(f"test{j + 2}", args.n_test) for j in range(args.extra_test)]
        for key, n in keys:
            if n:
                seed, name = TORCH_SETS[key]
                s = cached(parametric_renderer(backend="torch"), n, seed, name, args.workers)
                print(key, len(s), rel(s.path), flush=True)
        return 0
    for key, n, make, seed, name in (("real", args.n_real, real_renderer, 8003, "condbias_real"),
                                     ("test", args.n_test, parametric_renderer, 8002, "condbias_test"),
                                     ("cal", args.n_cal, parametric_renderer, 8001, "condbias_cal")):
        if n:
            s = cached(make(), n, seed, name, args.workers)
            print(key, len(s), rel(s.path), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
