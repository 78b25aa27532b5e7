"""Estimators shipped with the package, loadable by name: ``wlshear.load_estimator("clash-parametric")``.

Each entry is ``<name>.pt`` (a :meth:`~wlshear.models.estimator.ShearEstimator.save` file),
``<name>.md`` (its model card: data, training, measured figures, limits) and ``<name>.yaml`` (the
resolved training configuration) in this directory.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> one-line description (the model card has the rest)
PRETRAINED = {
    "clash-parametric": "paper CNN trained as its own 8-fold symmetry average on the structured "
                        "parametric population at CLASH depth (full noise, F814W-like, 0.065\"/px, "
                        "Gaussian PSF FWHM 0.121\")",
    "clash-parametric-plain": "the previous default: paper CNN trained plainly (8-fold average at "
                              "inference only) on 2M stamps of the same population",
    "clash-parametric-surface": "clash-parametric with a calibration surface m, c(magnitude, size): "
                                "less biased on magnified and selected samples (cluster fields), ~4% higher sigma",
    "clash-parametric-plain-surface": "clash-parametric-plain with a calibration surface m, c(magnitude, size)",
}

#: the estimator infer_clash.py uses when none is given
DEFAULT = "clash-parametric"


def pretrained_path(name: str) -> Path:
    """The file of shipped estimator ``name``; KeyError naming the available ones otherwise."""
    if name not in PRETRAINED:
        raise KeyError(f"no shipped estimator named {name!r}; available: {', '.join(sorted(PRETRAINED))}")
    path = HERE / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"shipped estimator {name!r} is registered but {path} is missing (broken install?)")
    return path


def model_card(name: str) -> str:
    """The model card (markdown) of shipped estimator ``name``."""
    pretrained_path(name)
    return (HERE / f"{name}.md").read_text()
