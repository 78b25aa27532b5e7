"""wlshear: CNN weak-lensing shear estimation from galaxy stamps.

Re-implements the method of Springer et al. 2018 (MNRAS), "Weak lensing shear estimation beyond
the shape-noise limit: a machine learning approach": GalSim simulations of CLASH-like stamps,
a small CNN regressing (g1, g2), symmetry averaging, a least-squares head refit, and a pipeline
for real HST cluster fields.
"""

__version__ = "0.1.0"


def load_estimator(path):
    """Load a trained, calibrated shear estimator saved by ``train.py`` (a path), or one shipped
    with the package by name: ``load_estimator("clash-parametric")`` (its model card:
    ``wlshear.models.pretrained.model_card(name)``).

    Returns an object with ``predict(stamps, symmetrize=True) -> (N, 2)`` calibrated shears.
    Usable without Hydra. See :mod:`wlshear.models.estimator`.
    """
    from wlshear.models.estimator import load_estimator as _load

    return _load(path)
