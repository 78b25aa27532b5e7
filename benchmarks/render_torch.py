"""Speed and accuracy of the torch renderer against the GalSim backend.

Usage: python benchmarks/render_torch.py [--n-speed 256 1024] [--n-acc 500] [--repeats 5]
                                         [--n-stream 2000] [--out FILE]

Per source (parametric with GalSim's default GSParams, parametric with the training config's
GSParams, and real COSMOS when ../shared/data/cosmos_real_100 exists):
- stamps/s of the GalSim backend and of the torch backend on one CPU thread
  (torch.set_num_threads(1)); the two are timed alternately in the same run (the machine is
  shared, so single timings are noisy), median of ``repeats`` draws of the same ``n_speed``
  stamps; the torch figure excludes the one-time galaxy preparation, which is reported per
  galaxy (cold draw minus warm draw, divided by the number of distinct galaxies), and the
  one-time per-process set-up (radial tables of the analytic path) is reported separately;
- accuracy on ``n_acc`` noiseless stamps (before mask): max |torch - GalSim| / stamp peak,
  adaptive-moment (galsim.hsm.FindAdaptiveMom, observed_shape distortion e1, e2) difference:
  max per-stamp |de| and mean de.
End to end: the training stream (ShearStream through EpochLoader, batch 100, num_workers=0,
parametric source, training config: homogenised population, CLASH noise, config GSParams) over
``n_stream`` stamps per backend, from fresh source objects and empty torch caches, so
preparation (and the radial tables) are included.
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

from wlshear.sim import torch_render
from wlshear.sim.constants import FAST_GSPARAMS
from wlshear.sim.render import StampRenderer, _galsim_backend
from wlshear.sim.sources import CosmosSource, ParametricSource

REPO = Path(__file__).resolve().parents[1]

COSMOS_DIR = Path(os.environ.get("WLSHEAR_SHARED", REPO.parent / "shared")) / "data" / "cosmos_real_100"


def _e(img):
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(img, dtype=np.float64)), strict=False)
    if res.error_message:
        return (np.nan, np.nan)
    return (res.observed_shape.e1, res.observed_shape.e2)


GSP_CONFIG = FAST_GSPARAMS  # conf/data/default.yaml's data.gsparams


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_source(name, make_source, args, gsparams=None):
    torch_render.clear_caches(tables=True)
    r = StampRenderer(make_source(), noise=None, backend="torch", gsparams=gsparams)
    size = r.stamp_size
    print(f"## source {name}")
    for n_speed in args.n_speed:
        p = r.sample_params(np.random.default_rng(1), n_speed)
        n_gal = len(np.unique(p.galaxy_id))
        _galsim_backend(r, p, size)  # warm GalSim's own per-galaxy caches
        t_first = _timed(lambda: torch_render.draw_batch(r, p, size))  # + radial tables if new
        torch_render.clear_caches()
        t_cold = _timed(lambda: torch_render.draw_batch(r, p, size))  # prepares every galaxy
        t_gs, t_t = [], []
        for _ in range(args.repeats):  # alternate the two backends
            t_gs.append(_timed(lambda: _galsim_backend(r, p, size)))
            t_t.append(_timed(lambda: torch_render.draw_batch(r, p, size)))
        t_gs, t_t = statistics.median(t_gs), statistics.median(t_t)
        prep_per_gal = max(t_cold - t_t, 0.0) / n_gal
        print(f"speed: N = {n_speed} stamps per batch ({n_gal} distinct galaxies), median of {args.repeats} "
              f"alternating repeats, 1 thread")
        print(f"  GalSim backend : {n_speed / t_gs:9.1f} stamps/s")
        print(f"  torch backend  : {n_speed / t_t:9.1f} stamps/s (prepared galaxies cached)")
        print(f"  ratio torch/GalSim = {t_gs / t_t:.1f}x")
        print(f"  one-time preparation: {prep_per_gal * 1e3:.2f} ms per galaxy; per-process set-up "
              f"(radial tables, grids): {max(t_first - t_cold, 0.0):.2f} s")
        print(f"  torch incl. preparation of every galaxy (each used once): {n_speed / t_cold:9.1f} stamps/s "
              f"= {t_gs / t_cold:.1f}x GalSim")
    kinds = {}
    for g in np.unique(p.galaxy_id):
        k = type(torch_render.prepared(r, int(g))).__name__
        kinds[k] = kinds.get(k, 0) + 1
    print(f"  prepared galaxies by path: {kinds}")
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
    print(f"  mean de (e1, e2)      : ({de[good, 0].mean():+.2e}, {de[good, 1].mean():+.2e}) "
          f"+- ({de[good, 0].std() / np.sqrt(good.sum()):.1e}, {de[good, 1].std() / np.sqrt(good.sum()):.1e})")
    print(f"  flux ratio torch/GalSim (median): {np.median(t[ok].sum((1, 2)) / g[ok].sum((1, 2))):.6f}")
    print()


def bench_stream(args):
    """End-to-end training stream (DataModule's ShearStream + EpochLoader), preparation included."""
    from wlshear.data.datamodule import ShearDataModule
    from wlshear.data.datasets import EpochLoader, ShearStream

    print(f"## end-to-end training stream: parametric source, ShearStream over {args.n_stream} stamps, "
          f"EpochLoader batch 100, num_workers=0, homogenised population, CLASH noise, config GSParams "
          f"{GSP_CONFIG}; fresh source and empty torch caches per run (preparation included)")
    bins = [[22.0, 24.0], [24.0, 25.5], [25.5, 27.0]]
    for chunk in args.stream_chunks:
        rates = {}
        for backend in ("galsim", "torch"):
            torch_render.clear_caches(tables=True)
            dm = ShearDataModule(ParametricSource(), backend=backend, num_workers=0, gsparams=GSP_CONFIG,
                                 mag_bins=bins, samples_per_epoch=args.n_stream, chunk=chunk, seed=0)
            loader = EpochLoader(ShearStream(dm.train_renderer, args.n_stream, seed=0, chunk=chunk),
                                 batch_size=100, num_workers=0)
            t0 = time.perf_counter()
            k = sum(len(x) for x, _ in loader)
            rates[backend] = k / (time.perf_counter() - t0)
        print(f"  chunk (stamps rendered per call) {chunk:4d}: GalSim {rates['galsim']:8.1f} stamps/s, "
              f"torch {rates['torch']:8.1f} stamps/s, ratio {rates['torch'] / rates['galsim']:.1f}x")
    print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-speed", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--n-acc", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-stream", type=int, default=2000, help="stamps of the end-to-end stream (0 = skip)")
    ap.add_argument("--stream-chunks", type=int, nargs="+", default=[50, 256],
                    help="ShearStream chunk sizes to measure (conf/data/default.yaml uses 50)")
    ap.add_argument("--out", default="benchmarks/RESULTS_render_torch.md", help="relative: to the repository")
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
        print(f"command: python benchmarks/render_torch.py --n-speed {' '.join(map(str, args.n_speed))} "
              f"--n-acc {args.n_acc} --repeats {args.repeats} --n-stream {args.n_stream} "
              f"--stream-chunks {' '.join(map(str, args.stream_chunks))}")
        print()
        bench_source("parametric (GalSim default GSParams)", ParametricSource, args)
        bench_source(f"parametric (config GSParams {GSP_CONFIG})", lambda: ParametricSource(gsparams=GSP_CONFIG),
                     args, gsparams=GSP_CONFIG)
        if COSMOS_DIR.exists():
            bench_source("cosmos (real, cosmos_real_100)", lambda: CosmosSource(COSMOS_DIR), args)
        else:
            print(f"cosmos: skipped ({COSMOS_DIR} absent)")
        if args.n_stream > 0:
            bench_stream(args)
    if args.out:
        with open(REPO / args.out, "a") as f:
            f.write("\n```\n" + buf.getvalue() + "```\n")


if __name__ == "__main__":
    main()
