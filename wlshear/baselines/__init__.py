"""Classical and external shear estimators with one interface.

Every baseline is a class with a ``name`` and ``estimate(stamps) -> (g, failed)``: ``stamps`` is a
float ``(N, 32, 32)`` array (axis order y, x; counts), ``g`` a float64 ``(N, 2)`` array of
(g1, g2) with NaN rows where ``failed`` (``(N,)`` bool) is True. See ``docs/CONVENTIONS.md``.

``BASELINES`` maps names to classes; ``get_baseline(name, **kw)`` instantiates one:

- ``moments``: released RRG-like weighted moments (returns un-calibrated chi);
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
from .wlenet import WLENetEstimator

__all__ = [
    "BASELINES",
    "Estimator",
    "get_baseline",
    "MomentsEstimator",
    "KSBEstimator",
    "REGAUSSEstimator",
    "FPFSEstimator",
    "WLENetEstimator",
]


class Estimator(Protocol):
    """Common interface of all shear estimators."""

    name: str

    def estimate(self, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


BASELINES: dict[str, type] = {
    "moments": MomentsEstimator,
    "ksb": KSBEstimator,
    "regauss": REGAUSSEstimator,
    "fpfs": FPFSEstimator,
    "wlenet": WLENetEstimator,
}


def get_baseline(name: str, **kw) -> Estimator:
    """Instantiate the baseline called ``name`` (case-insensitive) with keyword arguments ``kw``."""
    key = name.lower()
    if key not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    return BASELINES[key](**kw)
