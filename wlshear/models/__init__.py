"""CNN shear-estimation models: architectures, normalisation, symmetry averaging, head refit,
the Lightning training module and the stand-alone :class:`ShearEstimator`."""

from wlshear.models.architectures import (
    PaperCNN,
    ResNetSmall,
    WideCNN,
    build_net,
    net_spec,
    register_architecture,
    registered_architectures,
)
from wlshear.models.estimator import ShearEstimator, load_estimator
from wlshear.models.module import ShearRegressor, linear_bias_fit
from wlshear.models.normalize import normalize_stamps
from wlshear.models.refit import compute_features, fit_head_lstsq, refit_head
from wlshear.models.symmetry import apply, apply_np, shear_sign, symmetrize, transform_shear

__all__ = [
    "PaperCNN",
    "WideCNN",
    "ResNetSmall",
    "net_spec",
    "build_net",
    "register_architecture",
    "registered_architectures",
    "normalize_stamps",
    "apply",
    "apply_np",
    "shear_sign",
    "transform_shear",
    "symmetrize",
    "fit_head_lstsq",
    "compute_features",
    "refit_head",
    "ShearRegressor",
    "linear_bias_fit",
    "ShearEstimator",
    "load_estimator",
]
