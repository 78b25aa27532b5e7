"""Shear-estimation metrics: bias fits, binned, conditional and study statistics, and plots.

Plots live in :mod:`wlshear.metrics.plots` (the only modules that import matplotlib; not
imported here).
"""

from .bias import BiasFit, average_pairs, calibrate, fit_bias, fit_line, valid_rows
from .binned import bin_edges, binned_bias, to_csv, to_markdown

__all__ = [
    "BiasFit",
    "average_pairs",
    "calibrate",
    "fit_bias",
    "fit_line",
    "valid_rows",
    "bin_edges",
    "binned_bias",
    "to_csv",
    "to_markdown",
]
