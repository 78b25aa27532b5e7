"""Learning curves of training runs: validation sigma against training stamps.

    python benchmarks/learning_curve.py RUN_DIR [RUN_DIR ...] [--out benchmarks/RESULTS_learning_curve.png]

Reads each run's csv log (``csv/version_*/metrics.csv``: ``val/sigma1``, ``val/sigma2``,
``val/loss`` per epoch) and ``config_resolved.yaml`` (``data.samples_per_epoch``), prints the
table, fits sigma(N) = s_inf + a N^-b over the epochs and extrapolates it to the paper's 225M
stamps (100 epochs x 2.25M), and writes the plot. val/sigma is the non-symmetrised network's
calibrated residual on the (non-ring) validation set: a progress measure, below the test-set
figures of the symmetrised, refit estimator in absolute terms but with the same trend.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import curve_fit

from wlshear.metrics.plots import plot_learning_curve

REPO = Path(__file__).resolve().parents[1]
PAPER_STAMPS = 225e6


def read_curve(run_dir: Path):
    cfg = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    per_epoch = float(cfg["data"]["samples_per_epoch"])
    logs = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not logs:
        raise SystemExit(f"{run_dir}: no csv/version_*/metrics.csv (train with logger=csv, the default)")
    rows = [r for r in csv.DictReader(logs[-1].open()) if r.get("val/sigma1")]
    ep = np.array([int(r["epoch"]) for r in rows])
    sig = np.array([(float(r["val/sigma1"]) + float(r["val/sigma2"])) / 2 for r in rows])
    loss = np.array([float(r["val/loss"]) for r in rows])
    name = f"{run_dir.name} ({cfg['model']['net']['_target_'].rsplit('.', 1)[-1]})"
    return name, (ep + 1) * per_epoch, sig, loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS_learning_curve.png"))
    args = ap.parse_args(argv)
    curves, fits = {}, {}
    for run in args.runs:
        name, n, s, loss = read_curve(run)
        curves[name] = (n, s)
        print(f"# {name}")
        print(f"{'stamps':>10} {'val sigma':>10} {'val MSE':>10}")
        for a, b, c in zip(n, s, loss):
            print(f"{a:>10.0f} {b:>10.4f} {c:>10.5f}")
        if len(n) >= 4:
            f = lambda x, s0, a, b: s0 + a * (x / 1e6) ** (-b)  # noqa: E731
            try:
                p, _ = curve_fit(f, n, s, p0=(s[-1] - 0.005, 0.005, 0.5), bounds=([0, 0, 0.05], [1, 1, 3]), maxfev=20000)
                grid = np.geomspace(n[0], PAPER_STAMPS, 50)
                fits[name] = (grid, f(grid, *p))
                print(f"fit sigma = {p[0]:.4f} + {p[1]:.4f} (N / 1e6)^-{p[2]:.2f}: "
                      f"{f(PAPER_STAMPS, *p):.4f} at the paper's 225M stamps (extrapolated)")
            except RuntimeError as err:
                print(f"no power-law fit: {err}")
    print("wrote", plot_learning_curve(curves, Path(args.out), fits))


if __name__ == "__main__":
    main()
