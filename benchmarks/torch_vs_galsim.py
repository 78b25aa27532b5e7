"""Does a model trained on torch-rendered stamps see GalSim stamps the same way? (issue #7)

    python train.py data.backend=torch            # train on the batched torch renderer
    python benchmarks/torch_vs_galsim.py --estimator outputs/train/runs/<run>/estimator_refit.pt

Renders the same test set (same seed: same galaxies, shears, rotations, mirrors and noise) with
the GalSim backend and with the torch backend, in ring pairs, and fits g_est = (1 + m) g + c on
each. Because both sets share galaxies and noise, the shift dm = m_galsim - m_torch is measured
much more precisely than either m; it is reported with its own error (from fitting the per-stamp
difference of the two estimates) and compared with 2 sigma of m. Appends to
benchmarks/RESULTS_render_torch.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import wlshear
from _machine import append_results, machine_header
from wlshear.metrics.bias import fit_bias, fit_line
from wlshear.sim.augment import Augmentation
from wlshear.sim.constants import FAST_GSPARAMS as GSP
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.render import StampRenderer
from wlshear.sim.sources import ParametricSource

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--estimator", required=True, help="estimator file (trained with data.backend=torch)")
    ap.add_argument("--n", type=int, default=20000, help="test stamps (ring pairs)")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    est = wlshear.load_estimator(args.estimator)
    src = ParametricSource(gsparams=GSP)
    out = {}
    lines = [machine_header(), f"estimator: {args.estimator}", f"N = {args.n} test-mode stamps in ring pairs, seed {args.seed}"]
    for backend in ("galsim", "torch"):
        r = StampRenderer(src, CorrelatedNoise(), Augmentation().test_mode(), gsparams=GSP, backend=backend)
        t = time.perf_counter()
        b = r.simulate(args.n, args.seed, ring=True, workers=args.workers, progress=True)
        dt = time.perf_counter() - t
        g = est.predict(b.stamps, symmetrize=True, batch_size=256)
        fit = fit_bias(b.shear, g, pair_ids=b.meta["pair_id"])
        out[backend] = (b, g, fit)
        lines.append(f"{backend:6s} test set ({dt:.0f} s to render, {len(b.failures)} failed): {fit}")
    (bg, gg, fg), (bt, gt, ft) = out["galsim"], out["torch"]
    assert np.array_equal(bg.meta["galaxy_id"], bt.meta["galaxy_id"]), "backends rendered different galaxies"
    pix = np.max(np.abs(bg.stamps - bt.stamps), axis=(1, 2)) / np.max(np.abs(bg.stamps), axis=(1, 2))
    lines.append(f"max |stamp difference| / stamp max: median {np.median(pix):.2e}, worst {pix.max():.2e}")
    for i in range(2):
        slope, s_err, _, _ = fit_line(bg.shear[:, i], gg[:, i] - gt[:, i])
        sig_m = max(fg.m_err[i], ft.m_err[i])
        verdict = "within" if abs(slope) <= 2 * sig_m else "BEYOND"
        lines.append(f"g{i + 1}: m_galsim - m_torch = {slope:+.5f} +- {s_err:.5f}; sigma_m = {sig_m:.4f}; "
                     f"|dm| {verdict} 2 sigma_m")
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        append_results(REPO / "benchmarks" / "RESULTS_render_torch.md", "torch-trained model on GalSim vs torch test sets", text)
    return text


if __name__ == "__main__":
    main()
