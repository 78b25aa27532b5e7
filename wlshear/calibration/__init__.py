"""Conditional shear calibration: bias as a smooth function of measured galaxy observables."""

from wlshear.calibration.surface import CalibrationSurface, fit_surface, pair_means

__all__ = ["CalibrationSurface", "fit_surface", "pair_means"]
