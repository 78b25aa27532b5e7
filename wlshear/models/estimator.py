"""A trained CNN shear estimator usable without Hydra or Lightning, and its file format.

``ShearEstimator.predict(stamps)`` takes raw stamps in counts ``(N, 32, 32)`` (axis 0 = y/row,
axis 1 = x/column), normalises each stamp, runs the network (optionally averaged over the 8
symmetries of the square) and applies a linear calibration ``g = (g_raw - c) / (1 + m)`` per
component, returning ``(N, 2)`` float64 (g1, g2).

Pixel units: CLASH counts (zero-point 25.4193), background-subtracted. Stamps without usable
signal -- non-finite, all zero, flat, or a pixel std outside [1e-5, 1e4] counts (other units) --
are flagged and give NaN rows (:mod:`wlshear.models.input_checks`).

File format (``torch.save`` of a dict, readable with ``torch.load(weights_only=True)``)::

    {"format": "wlshear-estimator", "version": 1,
     "net": {"class_path": "wlshear.models.architectures.PaperCNN", "kwargs": {...}},
     "state_dict": {...}, "calibration": {"m1", "c1", "m2", "c2"},
     "normalize": True, "metadata": {...plain Python types...},
     "surface": None or {...CalibrationSurface.to_dict()...}}

Optional conditional calibration: ``surface`` (a :class:`wlshear.calibration.CalibrationSurface`)
corrects the globally calibrated shears per galaxy, ``(g - c(o)) / (1 + m(o))``, with the
observables ``o`` (magnitude, half-light radius, S/N) measured on the stamps by
``wlshear.baselines.photometry.measure_observables`` inside :meth:`ShearEstimator.predict`.
Files without the key (older files) load with no surface.

:func:`load_estimator` also reads a Lightning checkpoint written while training a
:class:`~wlshear.models.module.ShearRegressor` (the network is rebuilt from ``hparams["net_spec"]``);
such an estimator has no calibration: loading it warns (:class:`UncalibratedWarning`) and sets
``metadata["calibrated"] = False``. Only registered architectures are rebuilt
(:func:`wlshear.models.architectures.register_architecture`).
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from wlshear.models.architectures import build_net, net_spec
from wlshear.models.input_checks import check_stamps, flag_summary, stamp_array
from wlshear.models.normalize import normalize_stamps
from wlshear.models.symmetry import symmetrize
from wlshear.utils.plain import to_plain as _plain

__all__ = ["ShearEstimator", "load_estimator", "UncalibratedWarning", "FORMAT_NAME", "FORMAT_VERSION"]

log = logging.getLogger(__name__)


class UncalibratedWarning(UserWarning):
    """A loaded estimator has no fitted calibration (e.g. read from a Lightning checkpoint)."""


FORMAT_NAME = "wlshear-estimator"
FORMAT_VERSION = 1
_CAL_KEYS = ("m1", "c1", "m2", "c2")


class ShearEstimator:
    """Trained network + per-stamp normalisation + optional symmetry average + linear calibration.

    Args:
        net: network mapping normalised ``(B, 1, H, W)`` stamps to ``(B, 2)`` shears, with
            ``init_kwargs`` (all :mod:`wlshear.models.architectures` classes) so it can be saved.
            A ``ShearRegressor`` (anything with a ``.net``) is unwrapped.
        calibration: ``{"m1", "c1", "m2", "c2"}``; missing keys default to the identity (0).
        metadata: free-form description (training config summary, refit diagnostics, ...), saved as
            plain Python types.
        normalize: normalise each stamp (mean 0, std 1) before the network; keep True for nets
            trained by ``ShearRegressor``.
        device: torch device to run on.
        surface: optional :class:`wlshear.calibration.CalibrationSurface` (or its dict) applied per
            galaxy after the global calibration, on observables measured on the stamps.
    """

    def __init__(
        self,
        net: nn.Module,
        calibration: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
        normalize: bool = True,
        device: str | torch.device = "cpu",
        surface: Any = None,
    ) -> None:
        if isinstance(getattr(net, "net", None), nn.Module) and not hasattr(net, "head"):
            net = net.net  # unwrap a ShearRegressor (LightningModule) or ShearEstimator
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.calibration = {k: 0.0 for k in _CAL_KEYS}
        if calibration:
            self.set_calibration(**calibration)
        self.metadata = dict(metadata or {})
        self.normalize = bool(normalize)
        self.surface = None
        if surface is not None:
            self.set_surface(surface)

    # ------------------------------------------------------------------ conditional calibration
    def set_surface(self, surface: Any) -> None:
        """Attach a calibration surface (a ``CalibrationSurface``, its dict, or None to remove)."""
        if surface is None:
            self.surface = None
            return
        from wlshear.calibration.surface import CalibrationSurface

        if isinstance(surface, Mapping):
            surface = CalibrationSurface.from_dict(dict(surface))
        if not isinstance(surface, CalibrationSurface):
            raise ValueError(f"surface must be a CalibrationSurface or its dict, got {type(surface).__name__}")
        self.surface = surface

    # ------------------------------------------------------------------ calibration
    def set_calibration(self, m1: float = 0.0, c1: float = 0.0, m2: float = 0.0, c2: float = 0.0) -> None:
        """Set the bias model ``g_raw = (1 + m) g_true + c`` that :meth:`predict` inverts."""
        self.calibration = _checked_calibration(m1, c1, m2, c2)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_raw(
        self,
        stamps: np.ndarray | torch.Tensor,
        symmetrize: bool = True,
        batch_size: int = 4096,
        progress: bool = False,
    ) -> np.ndarray:
        """Uncalibrated network shears ``(N, 2)`` float64 for raw stamps ``(N, H, W)`` or ``(N, 1, H, W)``."""
        x = torch.as_tensor(np.asarray(stamps) if not isinstance(stamps, torch.Tensor) else stamps)
        if x.ndim == 2:
            raise ValueError(f"expected a batch of stamps (N, H, W); got one stamp {tuple(x.shape)}: use stamps[None]")
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3:
            raise ValueError(f"stamps must be (N, H, W) or (N, 1, H, W), got shape {tuple(x.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net.eval()
        dtype = next(self.net.parameters()).dtype
        out = np.empty((x.shape[0], 2), dtype=np.float64)
        starts = range(0, x.shape[0], batch_size)
        for s in tqdm(starts, desc="CNN shear", disable=not progress):
            xb = x[s : s + batch_size].to(device=self.device, dtype=dtype).unsqueeze(1)
            if self.normalize:
                xb = normalize_stamps(xb)
            g = _symmetrize(self.net, xb) if symmetrize else self.net(xb)
            out[s : s + batch_size] = g.double().cpu().numpy()
        return out

    def calibrate(self, g_raw: np.ndarray) -> np.ndarray:
        """Apply ``(g_raw - c) / (1 + m)`` per component."""
        cal = self.calibration
        m = np.array([cal["m1"], cal["m2"]])
        c = np.array([cal["c1"], cal["c2"]])
        return (np.asarray(g_raw, dtype=np.float64) - c) / (1.0 + m)

    def predict(
        self,
        stamps: np.ndarray | torch.Tensor,
        symmetrize: bool = True,
        batch_size: int = 4096,
        progress: bool = False,
        apply_surface: bool = True,
    ) -> np.ndarray:
        """Calibrated shears ``(N, 2)`` float64 = (g1, g2) for raw stamps in CLASH counts ``(N, 32, 32)``.

        With a calibration surface attached (and ``apply_surface``), the observables are measured
        on the stamps (``measure_observables``) and the per-galaxy correction is applied after the
        global calibration. Stamps without usable signal (non-finite, all zero, flat, pixel std
        outside [1e-5, 1e4] counts: :func:`~wlshear.models.input_checks.check_stamps`) give NaN
        rows; :meth:`predict_with_flags` returns the flags and reasons.
        """
        return self.predict_with_flags(stamps, symmetrize=symmetrize, batch_size=batch_size, progress=progress,
                                       apply_surface=apply_surface)[0]

    def predict_with_flags(self, stamps: np.ndarray | torch.Tensor, return_reasons: bool = False,
                           symmetrize: bool = True, batch_size: int = 4096, progress: bool = False,
                           apply_surface: bool = True) -> tuple[np.ndarray, ...]:
        """``(g (N, 2), failed (N,) bool)`` (plus ``reasons`` (N,) str with ``return_reasons``);
        failed rows -- unusable input (see :meth:`predict`) or non-finite output -- hold NaN."""
        x = stamp_array(stamps, getattr(self.net, "stamp_size", None))
        g = self.calibrate(self.predict_raw(x, symmetrize=symmetrize, batch_size=batch_size, progress=progress))
        if apply_surface and self.surface is not None:
            g = self.surface.apply_to_stamps(g, x)
        failed, reasons = check_stamps(x)
        bad_out = ~failed & ~np.isfinite(g).all(axis=1)
        reasons[bad_out] = "non-finite output"
        failed |= bad_out
        g[failed] = np.nan
        if failed.any():
            log.warning("%d of %d stamps flagged (NaN shear): %s", failed.sum(), len(failed), flag_summary(reasons))
        return (g, failed, reasons) if return_reasons else (g, failed)

    __call__ = predict

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """The serialisable content written by :meth:`save`."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "net": net_spec(self.net),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "calibration": dict(self.calibration),
            "normalize": self.normalize,
            "metadata": _plain(self.metadata),
            "surface": None if self.surface is None else _plain(self.surface.to_dict()),
            "torch_version": str(torch.__version__),
        }

    def save(self, path: str | Path) -> Path:
        """Write a self-contained estimator file (creates parent directories). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.to_dict(), tmp)
        tmp.replace(path)  # atomic: never leaves a half-written estimator behind
        return path

    def __repr__(self) -> str:
        return (
            f"ShearEstimator(net={type(self.net).__name__}, calibration={self.calibration}, "
            f"normalize={self.normalize}, surface={self.surface!r}, device={self.device})"
        )


def _checked_calibration(m1: float = 0.0, c1: float = 0.0, m2: float = 0.0, c2: float = 0.0) -> dict[str, float]:
    """``{"m1", "c1", "m2", "c2"}`` as floats; ValueError unless finite with 1 + m > 0."""
    cal = {"m1": float(m1), "c1": float(c1), "m2": float(m2), "c2": float(c2)}
    for k, v in cal.items():
        if not math.isfinite(v):
            raise ValueError(f"calibration {k} must be finite, got {v}")
    if cal["m1"] <= -1 or cal["m2"] <= -1:
        raise ValueError(f"calibration needs 1 + m > 0, got m1 = {cal['m1']}, m2 = {cal['m2']}")
    return cal


def _symmetrize(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return symmetrize(net, x)


def _read(path: Path, map_location: Any, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise ValueError(
                f"{path} holds Python objects that torch.load(weights_only=True) refuses to unpickle "
                f"({exc}). If you trust the file, call load_estimator(..., weights_only=False)."
            ) from exc
        raise ValueError(f"{path} is not a readable torch file (corrupt or wrong format): {exc}") from exc
    except Exception as exc:  # torch raises many types here (RuntimeError, EOFError, IndexError, ...)
        raise ValueError(
            f"{path} is not a readable torch file (corrupt, truncated or wrong format): {exc}"
        ) from exc


def _check_loaded(path: Path, calibration: Mapping[str, float], metadata: Mapping[str, Any]) -> None:
    """A bad calibration is named as such (not as a bad surface); a Lightning checkpoint, which
    has no calibration, is loaded with an :class:`UncalibratedWarning`."""
    try:
        _checked_calibration(**{k: calibration.get(k, 0.0) for k in _CAL_KEYS})
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid calibration {calibration!r}: {exc}") from exc
    if metadata.get("source_checkpoint") and metadata.get("calibrated") is False:
        msg = (f"{path} is a Lightning checkpoint: the estimator has no fitted calibration (m = c = 0, no head "
               "refit calibration), so its shears are biased; use the run's estimator_refit.pt for calibrated shears")
        warnings.warn(msg, UncalibratedWarning, stacklevel=3)
        log.warning(msg)


def load_estimator(
    path: str | Path,
    device: str | torch.device = "cpu",
    weights_only: bool = True,
) -> ShearEstimator:
    """Load a :class:`ShearEstimator` from a file written by :meth:`ShearEstimator.save`, or from a
    Lightning checkpoint of a ``ShearRegressor`` (identity calibration, metadata from its hparams).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt, of an unknown format, or its network cannot be rebuilt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no estimator file at {path} (absolute: {path.resolve()}); train one and save it with "
            "ShearEstimator.save(path), or pass a ShearRegressor Lightning checkpoint"
        )
    obj = _read(path, map_location="cpu", weights_only=weights_only)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not contain a wlshear estimator (found {type(obj).__name__})")

    if obj.get("format") == FORMAT_NAME:
        version = obj.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported estimator format version {version} (this code reads {FORMAT_VERSION})")
        missing = [k for k in ("net", "state_dict") if k not in obj]
        if missing:
            raise ValueError(f"{path}: estimator file lacks {missing}; it is corrupt")
        spec, state = obj["net"], obj["state_dict"]
        calibration = obj.get("calibration") or {}
        metadata = obj.get("metadata") or {}
        normalize = bool(obj.get("normalize", True))
        surface = obj.get("surface")
    elif "state_dict" in obj and "hyper_parameters" in obj:
        hp = obj["hyper_parameters"] or {}
        spec = hp.get("net_spec")
        if not spec:
            raise ValueError(
                f"{path} is a Lightning checkpoint without hparams['net_spec'] (not written by "
                "wlshear.models.ShearRegressor with a wlshear architecture); rebuild the net yourself "
                "and use ShearRegressor.load_from_checkpoint(path, net=net)"
            )
        prefix = "net."
        state = {k[len(prefix):]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{path}: checkpoint state_dict has no 'net.*' entries")
        calibration = {}
        metadata = {"source_checkpoint": str(path), "hparams": _plain(hp), "calibrated": False,
                    "epoch": obj.get("epoch"), "global_step": obj.get("global_step")}
        normalize = True
        surface = None
    else:
        raise ValueError(
            f"{path} is neither a wlshear estimator file (format={obj.get('format')!r}) nor a "
            "ShearRegressor Lightning checkpoint"
        )

    _check_loaded(path, calibration, metadata)
    net = build_net(spec)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match the saved architecture {spec.get('class_path')}: {exc}") from exc
    try:
        return ShearEstimator(net, calibration=calibration, metadata=metadata, normalize=normalize, device=device,
                              surface=surface)
    except ValueError as exc:
        raise ValueError(f"{path}: invalid calibration surface: {exc}") from exc
