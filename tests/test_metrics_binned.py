"""Binned bias statistics, CSV/Markdown writers and plots."""

import csv

import numpy as np

from wlshear.metrics.binned import bin_edges, binned_bias, to_csv, to_markdown
from wlshear.metrics.plots import plot_shear_scatter, plot_stamp_grid, plot_study


def _data(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    mag = rng.uniform(20, 26, n)
    g = rng.uniform(-0.2, 0.2, (n, 2))
    noise = 0.05 + 0.05 * (mag - 20)  # fainter -> noisier
    m = np.where(mag < 23, 0.0, 0.2)  # bias only for faint galaxies
    est = (1 + m[:, None]) * g + rng.normal(0, 1, (n, 2)) * noise[:, None]
    return mag, g, est


def test_binned_bias_tracks_injected_trends():
    mag, g, est = _data()
    failed = np.zeros(len(mag), bool)
    failed[::100] = True
    rows = binned_bias(mag, g, est, bins=[20, 23, 26], failed=failed, quantity="mag",
                       extra={"estimator": "toy"})
    assert len(rows) == 2 and rows[0]["estimator"] == "toy"
    bright, faint = rows
    assert abs(bright["m1"]) < 3 * bright["m1_err"]
    assert abs(faint["m1"] - 0.2) < 3 * faint["m1_err"]
    assert faint["sigma1"] > bright["sigma1"]
    assert bright["n"] + faint["n"] + bright["n_failed"] + faint["n_failed"] == len(mag)
    assert bright["n_failed"] + faint["n_failed"] == failed.sum()
    assert 20 < bright["mag_mean"] < 23


def test_quantile_bins_are_equal_count():
    mag, g, est = _data()
    edges = bin_edges(mag, 4)
    assert len(edges) == 5
    rows = binned_bias(mag, g, est, bins=4)
    counts = [r["n"] for r in rows]
    assert sum(counts) == len(mag) and max(counts) - min(counts) <= 2


def test_csv_and_markdown(tmp_path):
    mag, g, est = _data(2000)
    rows = binned_bias(mag, g, est, bins=3, quantity="mag")
    p = to_csv(rows, tmp_path / "sub" / "binned.csv")
    with open(p) as f:
        back = list(csv.DictReader(f))
    assert len(back) == 3
    assert float(back[1]["m1"]) == rows[1]["m1"]
    md = to_markdown(rows, columns=["mag_lo", "mag_hi", "n", "sigma1"])
    assert md.count("\n") == 5 and md.startswith("| mag_lo |")


def test_plots_write_files(tmp_path):
    mag, g, est = _data(3000)
    failed = np.zeros(len(mag), bool)
    failed[0] = True
    p1 = plot_shear_scatter(g, est, tmp_path / "scatter.png", failed=failed)
    rows_a = binned_bias(mag, g, est, bins=4, quantity="mag", extra={"estimator": "a"})
    rows_b = binned_bias(mag, g, 0.9 * est, bins=4, quantity="mag", extra={"estimator": "b"})
    p2 = plot_study(rows_a + rows_b, "mag_mean", tmp_path / "binned.png", "mag", stats=("sigma", "m"))
    stamps = np.random.default_rng(0).normal(size=(10, 32, 32))
    p3 = plot_stamp_grid(stamps, tmp_path / "grid.png", ncols=4, titles=list(range(10)))
    for p in (p1, p2, p3):
        assert p.is_file() and p.stat().st_size > 1000
