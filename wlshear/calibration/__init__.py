"""Conditional shear calibration: bias as a smooth function of measured galaxy observables."""

from wlshear.calibration.select import default_candidates, residual_chi2, select_surface
from wlshear.calibration.surface import CalibrationSurface, fit_surface, pair_means

__all__ = ["CalibrationSurface", "fit_surface", "pair_means", "select_surface", "residual_chi2",
           "default_candidates"]
