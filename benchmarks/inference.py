"""Inference speed per CPU core: the CNN (with and without the 8-fold symmetry average) and every
baseline, on the same rendered stamps.

    python benchmarks/inference.py [--n 1000] [--repeats 5] [--no-append]

Everything runs on one thread (torch.set_num_threads(1) and OMP/MKL/OpenBLAS threads = 1), so the
figures are stamps per second per core. The CNN is a PaperCNN with random weights (speed does not
depend on the weights) run through ``ShearEstimator.predict`` (normalisation + network + average),
the path ``evaluate.py`` uses. Each figure is the median over ``--repeats`` timed runs after one
warm-up. The output is printed and appended to ``benchmarks/RESULTS.md`` under a dated header.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TARGET_CNN_SYM = 1000.0  # stamps / s / core with the 8-fold average (issue #4)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _stamps(n: int, seed: int = 0) -> np.ndarray:
    from wlshear.sim.augment import Augmentation
    from wlshear.sim.constants import FAST_GSPARAMS as gsp
    from wlshear.sim.noise import CorrelatedNoise
    from wlshear.sim.render import StampRenderer
    from wlshear.sim.sources import ParametricSource

    src = ParametricSource(n_galaxies=2000, gsparams=gsp)
    r = StampRenderer(src, CorrelatedNoise(), Augmentation().test_mode(), gsparams=gsp)
    return r.simulate(n, seed).stamps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="rendered stamps (baselines)")
    ap.add_argument("--cnn-n", type=int, default=4096, help="stamps per CNN timing (tiled from --n)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-sizes", default="64,256,1024", help="CNN batch sizes to time")
    ap.add_argument("--baselines", default="moments,ksb,regauss,fpfs,wlenet")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from wlshear.tasks.estimators import build_baselines
    from wlshear.utils.hydra import compose_config
    from wlshear.baselines.wlenet import default_release_dir
    from wlshear.models.architectures import PaperCNN
    from wlshear.models.estimator import ShearEstimator

    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    import galsim
    import scipy

    out(f"## {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    out("")
    out(f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"os.cpu_count() = {os.cpu_count()}, torch threads = {torch.get_num_threads()}")
    out(f"- versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, galsim {galsim.__version__}")
    try:
        import anacal

        out(f"- anacal {anacal.__version__}")
    except ImportError:
        pass
    t0 = time.perf_counter()
    stamps = _stamps(args.n)
    out(f"- stamps: {len(stamps)} rendered parametric stamps with CLASH noise "
        f"({time.perf_counter() - t0:.1f} s to render); median of {args.repeats} repeats after a warm-up")
    out("")
    out("| estimator | batch | N | stamps/s/core |")
    out("|---|---|---|---|")

    est = ShearEstimator(PaperCNN())
    x = np.ascontiguousarray(np.resize(stamps, (args.cnn_n,) + stamps.shape[1:]))
    best = {}
    for sym in (False, True):
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            dt = _time(lambda: est.predict(x, symmetrize=sym, batch_size=bs), args.repeats)
            rate = len(x) / dt
            name = "cnn_sym (8-fold)" if sym else "cnn"
            best[sym] = max(best.get(sym, 0.0), rate)
            out(f"| {name} | {bs} | {len(x)} | {rate:,.0f} |")

    for name in [b for b in args.baselines.split(",") if b]:
        if name == "wlenet" and not default_release_dir().exists():
            out(f"| wlenet | - | - | skipped: no release at {default_release_dir()} |")
            continue
        built, skipped = build_baselines(compose_config("evaluate", [f"baselines=[{name}]", f"paths.root_dir={REPO}"]).baselines)
        if name in skipped:
            out(f"| {name} | - | - | skipped: {skipped[name]} |")
            continue
        bl = built[name]
        reps = max(1, min(args.repeats, 3))
        dt = _time(lambda: bl.estimate(stamps), reps)
        out(f"| {name} | {len(stamps)} | {len(stamps)} | {len(stamps) / dt:,.0f} |")
    out("")
    ok = best[True] >= TARGET_CNN_SYM
    out(f"CNN with 8-fold averaging: {best[True]:,.0f} stamps/s/core (best batch size); target "
        f">= {TARGET_CNN_SYM:,.0f}: {'met' if ok else 'NOT met'}. Without averaging: {best[False]:,.0f}.")
    out("")
    if not args.no_append:
        path = REPO / "benchmarks" / "RESULTS.md"
        if not path.exists():
            path.write_text("# Inference benchmarks (benchmarks/inference.py)\n\n"
                            "One section per run, newest last; stamps per second on one CPU core.\n\n")
        with path.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"appended to {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
