"""Speed and accuracy of the torch renderer against the GalSim backend.

Usage: python benchmarks/render_torch.py [--n-speed 256] [--n-acc 300] [--repeats 3] [--out FILE]

Per source (parametric always; real COSMOS when ../shared/data/cosmos_real_100 exists):
- stamps/s of the GalSim backend and of the torch backend on one CPU thread
  (torch.set_num_threads(1)), median of ``repeats`` draws of the same ``n_speed`` stamps; the
  torch figure excludes the one-time galaxy preparation, which is reported per galaxy;
- accuracy on ``n_acc`` noiseless stamps (before mask): max |torch - GalSim| / stamp peak,
  adaptive-moment (galsim.hsm.FindAdaptiveMom, observed_shape distortion e1, e2) difference:
  max per-stamp |de| and mean de.
The printed report is also appended to benchmarks/RESULTS_render_torch.md (or --out).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import galsim
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wlshear.sim import torch_render  # noqa: E402
from wlshear.sim.render import StampRenderer, _galsim_backend  # noqa: E402
from wlshear.sim.sources import CosmosSource, ParametricSource  # noqa: E402

COSMOS_DIR = Path(os.environ.get("WLSHEAR_SHARED", REPO.parent / "shared")) / "data" / "cosmos_real_100"


def _e(img):
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(img, dtype=np.float64)), strict=False)
    if res.error_message:
        return (np.nan, np.nan)
    return (res.observed_shape.e1, res.observed_shape.e2)


def _median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_source(name, source, args):
    r = StampRenderer(source, noise=None, backend="torch")
    size = r.stamp_size
    # speed
    p = r.sample_params(np.random.default_rng(1), args.n_speed)
    _galsim_backend(r, p, size)  # warm GalSim's own per-galaxy caches
    t_gs = _median_time(lambda: _galsim_backend(r, p, size), args.repeats)
    torch_render.CACHE.clear()
    n_gal = len(np.unique(p.galaxy_id))
    t0 = time.perf_counter()
    torch_render.draw_batch(r, p, size)
    t_first = time.perf_counter() - t0
    t_t = _median_time(lambda: torch_render.draw_batch(r, p, size), args.repeats)
    prep_per_gal = max(t_first - t_t, 0.0) / n_gal
    print(f"## source {name}")
    print(f"speed: N = {args.n_speed} stamps per batch ({n_gal} distinct galaxies), median of {args.repeats}, 1 thread")
    print(f"  GalSim backend : {args.n_speed / t_gs:9.1f} stamps/s")
    print(f"  torch backend  : {args.n_speed / t_t:9.1f} stamps/s (prepared galaxies cached)")
    print(f"  ratio torch/GalSim = {t_gs / t_t:.2f}x")
    print(f"  one-time preparation: {prep_per_gal * 1e3:.1f} ms per galaxy")
    # accuracy
    pa = r.sample_params(np.random.default_rng(2), args.n_acc)
    g, fg = _galsim_backend(r, pa, size)
    t, ft = torch_render.draw_batch(r, pa, size)
    ok = np.all(np.isfinite(g), axis=(1, 2)) & np.all(np.isfinite(t), axis=(1, 2))
    res = np.abs(t - g).max(axis=(1, 2))[ok] / g.max(axis=(1, 2))[ok]
    eg = np.array([_e(x) for x in g[ok]])
    et = np.array([_e(x) for x in t[ok]])
    de = et - eg
    good = np.all(np.isfinite(de), axis=1)
    ade = np.abs(de[good]).max(axis=1)
    print(f"accuracy: N = {args.n_acc} noiseless stamps (failures GalSim {len(fg)}, torch {len(ft)}; "
          f"HSM failed on {np.sum(~good)})")
    print(f"  max |residual| / peak : max {res.max():.2e}, median {np.median(res):.2e}")
    print(f"  |de| per stamp        : max {ade.max():.2e}, 99th pct {np.percentile(ade, 99):.2e}, "
          f"fraction > 1e-3 = {np.mean(ade > 1e-3):.3f}")
    print(f"  mean de (e1, e2)      : ({de[good, 0].mean():+.2e}, {de[good, 1].mean():+.2e})")
    print(f"  flux ratio torch/GalSim (median): {np.median(t[ok].sum((1, 2)) / g[ok].sum((1, 2))):.6f}")
    print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-speed", type=int, default=256)
    ap.add_argument("--n-acc", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS_render_torch.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            sys.__stdout__.write(s)
            sys.__stdout__.flush()
            buf.write(s)
            return len(s)

    with redirect_stdout(Tee()):
        print(f"# render_torch benchmark {time.strftime('%Y-%m-%d %H:%M:%S')}")
        print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
              f"CPU count {os.cpu_count()}")
        print(f"versions: python {platform.python_version()}, torch {torch.__version__}, galsim {galsim.__version__}, "
              f"numpy {np.__version__}")
        print(f"torch renderer settings: {torch_render.SETTINGS}")
        print(f"command: python benchmarks/render_torch.py --n-speed {args.n_speed} --n-acc {args.n_acc} "
              f"--repeats {args.repeats}")
        print()
        bench_source("parametric", ParametricSource(), args)
        if COSMOS_DIR.exists():
            bench_source("cosmos (real, cosmos_real_100)", CosmosSource(COSMOS_DIR), args)
        else:
            print(f"cosmos: skipped ({COSMOS_DIR} absent)")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n```\n" + buf.getvalue() + "```\n")


if __name__ == "__main__":
    main()
