"""Every plot of the package (the only modules that import matplotlib; Agg backend).

Each function takes arrays or result rows and an output path, writes the figure there (format from
the file suffix) and returns the path as a :class:`pathlib.Path`:

- :mod:`.shear`: estimated vs true shear, per-bin bias, the evaluate studies' curves, conditional bias;
- :mod:`.stamps`: stamp grids (and reading a PNG back for image loggers);
- :mod:`.clash`: star/galaxy separation, shear sticks and shear profiles of a cluster field;
- :mod:`.sweeps`: the summary of a sweep, learning curves;
- :mod:`.population`: a population's shape distributions against reference fits.
"""

from wlshear.metrics.plots.clash import plot_profile, plot_sigma_vs_scale, plot_star_galaxy, plot_whiskers
from wlshear.metrics.plots.population import plot_population
from wlshear.metrics.plots.shear import plot_bin_bias, plot_conditional, plot_shear_bins, plot_shear_scatter, plot_study
from wlshear.metrics.plots.stamps import plot_stamp_grid, read_png
from wlshear.metrics.plots.sweeps import plot_learning_curve, plot_summary

__all__ = [
    "plot_bin_bias",
    "plot_conditional",
    "plot_learning_curve",
    "plot_population",
    "plot_profile",
    "plot_shear_bins",
    "plot_shear_scatter",
    "plot_sigma_vs_scale",
    "plot_stamp_grid",
    "plot_star_galaxy",
    "plot_study",
    "plot_summary",
    "plot_whiskers",
    "read_png",
]
