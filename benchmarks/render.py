"""Rendering throughput per source: raw single-process draw and through the DataModule.

    python benchmarks/render.py [--n 600] [--repeats 3] [--sources parametric cosmos]

Prints stamps/s (median of repeats) for each source: the raw renderer in one process, and the
training DataLoader with 0, 1 and 2 workers (workers render while the main process only
collects). The target is DataModule throughput >= 90% of (raw rate x workers). Appends its output
to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _machine import append_results, machine_header
from wlshear.data.datasets import EpochLoader, ShearStream
from wlshear.sim.constants import FAST_GSPARAMS as GSP
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.render import StampRenderer
from wlshear.sim.sources import CosmosSource, ParametricSource

REPO = Path(__file__).resolve().parents[1]


def make_renderer(name: str) -> StampRenderer | None:
    if name == "parametric":
        src = ParametricSource(gsparams=GSP)
        bins = [[22, 24], [24, 25.5], [25.5, 27]]
    elif name == "cosmos":
        d = REPO.parent / "shared" / "data" / "cosmos_real_100"
        if not d.exists():
            print(f"cosmos: skipped ({d} absent)")
            return None
        src = CosmosSource(d, gsparams=GSP)
        bins = [[16, 23], [23, 24], [24, 25]]
    else:
        raise ValueError(name)
    return StampRenderer(src, CorrelatedNoise(), population="homogenised", mag_bins=bins, gsparams=GSP)


def raw_rate(r: StampRenderer, n: int, seed: int) -> float:
    t = time.perf_counter()
    r.simulate(n, seed, chunk=64)
    return n / (time.perf_counter() - t)


def loader_rate(r: StampRenderer, n: int, workers: int, seed: int) -> float:
    loader = EpochLoader(ShearStream(r, n, seed=seed, chunk=64), batch_size=100, num_workers=workers)
    t = time.perf_counter()
    k = 0
    for x, _ in loader:
        k += len(x)
    return k / (time.perf_counter() - t)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sources", nargs="+", default=["parametric", "cosmos"])
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = [machine_header(), f"N = {args.n} stamps per measurement, median of {args.repeats} repeats"]
    for name in args.sources:
        r = make_renderer(name)
        if r is None:
            lines.append(f"{name}: skipped (data absent)")
            continue
        r.simulate(200, 999)  # warm caches (profiles built once per process)
        raw = statistics.median(raw_rate(r, args.n, s) for s in range(args.repeats))
        lines.append(f"{name:11s} raw draw, 1 process       : {raw:8.1f} stamps/s")
        for w in (0, 1, 2):
            rate = statistics.median(loader_rate(r, args.n, w, s) for s in range(args.repeats))
            ideal = raw * max(w, 1)
            lines.append(f"{name:11s} DataModule, {w} worker(s)   : {rate:8.1f} stamps/s "
                         f"({100 * rate / ideal:5.1f}% of raw x {max(w, 1)})")
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        append_results(REPO / "benchmarks" / "RESULTS.md", "render.py", text)
    return text


if __name__ == "__main__":
    main()
