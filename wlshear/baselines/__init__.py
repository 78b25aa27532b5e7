"""Classical and external shear estimators with one interface.

Every baseline is a class with a ``name`` and ``estimate(stamps) -> (g, failed)``: ``stamps`` is a
float ``(N, 32, 32)`` array (axis order y, x; counts), ``g`` a float64 ``(N, 2)`` array of
(g1, g2) with NaN rows where ``failed`` (``(N,)`` bool) is True. See ``docs/CONVENTIONS.md``.

evaluate.py builds them from ``conf/baselines/*.yaml`` by ``_target_`` (``baselines=[moments,ksb]``):

- ``moments``: released RRG-like weighted moments (returns un-calibrated chi);
- ``rrg``: Rhodes, Refregier & Groth (2000), second and fourth moments, PSF-corrected, divided by
  the population's shear susceptibility (a shear estimate without a fitted calibration);
- ``ksb`` / ``regauss``: GalSim HSM KSB (shear) and REGAUSS (distortion -> shear);
- ``fpfs``: AnaCal FPFS at the stamp centre (needs the ``anacal`` package);
- ``wlenet``: the paper authors' released Keras CNN, run in numpy (needs h5py and the release
  files in ``shared/data/wlenet_release``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .fpfs import FPFSEstimator
from .hsm import KSBEstimator, REGAUSSEstimator
from .moments import MomentsEstimator
from .rrg import RRGEstimator
from .wlenet import WLENetEstimator

__all__ = [
    "Estimator",
    "MomentsEstimator",
    "RRGEstimator",
    "KSBEstimator",
    "REGAUSSEstimator",
    "FPFSEstimator",
    "WLENetEstimator",
]


class Estimator(Protocol):
    """Common interface of all shear estimators."""

    name: str

    def estimate(self, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    # optional: ``whole_batch`` True when the estimate depends on the whole batch (never split it)
