"""Stamp simulation: galaxy sources, PSF, noise, augmentation and the one stamp renderer."""

from wlshear.sim.constants import (  # noqa: F401
    ALPHA_RESCALE,
    PIXEL_SCALE,
    STAMP_SIZE,
    ZP_CLASH,
    ZP_COSMOS,
)
