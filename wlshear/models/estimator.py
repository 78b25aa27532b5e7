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
     "surface": None or {...CalibrationSurface.to_dict()...},
     "metacal": None or {...MetacalSettings.to_dict()...}, "counterfactual_input": bool}

Metacalibration (``../shared/method.md``, last section): with ``metacal`` settings in the file (any
estimator trained with ``metacal=default``, or settings given by hand), :meth:`ShearEstimator.metacal`
returns the network's shear on the no-shear counterfactual image and the per-galaxy response
``R`` measured on the +-d counterfactuals, from the file alone. ``counterfactual_input`` marks a
network trained on counterfactual images: :meth:`ShearEstimator.predict` then applies the no-shear
counterfactual (with fixnoise) to raw stamps itself.

Optional conditional calibration: ``surface`` (a :class:`wlshear.calibration.CalibrationSurface`)
corrects the globally calibrated shears per galaxy, ``(g - c(o)) / (1 + m(o))``, with the
observables ``o`` (magnitude, half-light radius, S/N) measured on the stamps by
``wlshear.observables.measure_observables`` inside :meth:`ShearEstimator.predict`.
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
from wlshear.sim.metacal import SHEAR_NAMES, MetacalOperator, MetacalSettings
from wlshear.utils.plain import to_plain as _plain
from wlshear.utils.precision import full_precision

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
        metacal: optional metacalibration settings (:class:`~wlshear.sim.metacal.MetacalSettings`,
            its dict, or a ``MetacalOperator``) used by :meth:`metacal`.
        counterfactual_input: the network was trained on no-shear counterfactual images; raw stamps
            are mapped to that domain (with fixnoise) before the network in every prediction.
    """

    def __init__(
        self,
        net: nn.Module,
        calibration: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
        normalize: bool = True,
        device: str | torch.device = "cpu",
        surface: Any = None,
        metacal: Any = None,
        counterfactual_input: bool = False,
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
        self.metacal_operator: MetacalOperator | None = None
        if metacal is not None:
            self.set_metacal(metacal)
        self.counterfactual_input = bool(counterfactual_input)
        if self.counterfactual_input and self.metacal_operator is None:
            raise ValueError("counterfactual_input=True needs the metacal settings the network was trained with")

    # ------------------------------------------------------------------ metacalibration settings
    def set_metacal(self, metacal: Any) -> None:
        """Attach metacal settings (``MetacalSettings``, its dict, a ``MetacalOperator``; None removes)."""
        if metacal is None:
            self.metacal_operator = None
        elif isinstance(metacal, MetacalOperator):
            self.metacal_operator = metacal
        elif isinstance(metacal, (MetacalSettings, Mapping)):
            self.metacal_operator = MetacalOperator(metacal)
        else:
            raise ValueError(f"metacal must be MetacalSettings, its dict or a MetacalOperator, got {type(metacal).__name__}")

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

    def compose_calibration(self, extra: Mapping[str, float]) -> dict[str, float]:
        """The calibration equivalent to this estimator's followed by ``extra``: ``extra`` is the bias
        ``g = (1 + m') g_true + c'`` of this estimator's calibrated output (e.g. re-fitted on a new set),
        so ``g_raw = (1 + m)((1 + m') g_true + c') + c``. Pass the result to :meth:`set_calibration`."""
        out = {}
        for k in (1, 2):
            mo, co = self.calibration[f"m{k}"], self.calibration[f"c{k}"]
            mn, cn = float(extra.get(f"m{k}", 0.0)), float(extra.get(f"c{k}", 0.0))
            out[f"m{k}"] = (1 + mo) * (1 + mn) - 1
            out[f"c{k}"] = (1 + mo) * cn + co
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_raw(
        self,
        stamps: np.ndarray | torch.Tensor,
        symmetrize: bool = True,
        batch_size: int = 4096,
        progress: bool = False,
        seed: int | None = 0,
    ) -> np.ndarray:
        """Uncalibrated network shears ``(N, 2)`` float64 for raw stamps ``(N, H, W)`` or ``(N, 1, H, W)``.

        ``seed`` seeds the fixnoise fields when the network takes counterfactual images
        (``counterfactual_input``); None draws fresh ones. Numpy input may have either byte order
        (FITS images, e.g. ``astropy.io.fits.getdata``, are big-endian; converted here).
        """
        x = _as_stamps(stamps)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net.eval()
        dtype = next(self.net.parameters()).dtype
        out = np.empty((x.shape[0], 2), dtype=np.float64)
        starts = range(0, x.shape[0], batch_size)
        gen = _generator(seed) if self.counterfactual_input else None
        with full_precision():
            for s in tqdm(starts, desc="CNN shear", disable=not progress):
                xb = x[s : s + batch_size].to(device=self.device, dtype=dtype).unsqueeze(1)
                if self.counterfactual_input:
                    xb = self._noshear(xb, gen)
                if self.normalize:
                    xb = normalize_stamps(xb)
                g = _symmetrize(self.net, xb) if symmetrize else self.net(xb)
                out[s : s + batch_size] = g.double().cpu().numpy()
        return out

    def _noshear(self, xb: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        op = self.metacal_operator
        finite = torch.isfinite(xb.reshape(len(xb), -1)).all(dim=1)
        # non-finite stamps stay non-finite (NaN rows); the output is the central stamp_size
        n = int(op.settings.stamp_size)
        out = torch.full((len(xb), 1, n, n), float("nan"), dtype=xb.dtype, device=xb.device)
        if finite.any():
            noise = op.sample_noise(int(finite.sum()), "cpu", torch.float32, gen, size=int(xb.shape[-1])).to(xb) \
                if op.adds_noise else None
            cf = op.counterfactuals(xb[finite], ("noshear",), noise=noise)
            out[finite] = cf.to(xb)
        return out

    @torch.no_grad()
    def metacal(
        self,
        stamps: np.ndarray | torch.Tensor,
        symmetrize: bool = True,
        batch_size: int = 64,
        seed: int | None = 0,
        return_sheared: bool = False,
        progress: bool = False,
        noise_groups: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Metacalibration of raw observed stamps ``(N, S, S)`` [counts], ``S = 32 + 2 margin``.

        The operator needs the light just outside each 32 x 32 stamp: give stamps with the margin of
        ``metacal_operator.settings.margin`` (8 px: 48 x 48, what training used); 32 x 32 stamps
        work too, but large galaxies then lose the light beyond the stamp edge (m1 ~ -0.02 for
        hlr > 4 px, ``wlshear.sim.metacal``).

        Each stamp is mapped to five counterfactual images (no shear, and +-d on each component,
        with fixnoise; ``wlshear.sim.metacal``), the network (symmetry-averaged if ``symmetrize``)
        measures all five, and:

        - ``"g"``: ``(N, 2)`` network shears on the no-shear counterfactual (no simulation
          calibration: the response replaces it);
        - ``"R"``: ``(N, 2, 2)`` per-galaxy responses ``R[:, i, j] = (g_i(+d_j) - g_i(-d_j)) / (2 d)``;
        - ``"failed"``: ``(N,)`` bool, True for stamps without usable signal (their rows are NaN):
          non-finite pixels, all zero, flat, or a pixel scale outside CLASH counts (as :meth:`predict`);
        - ``"reasons"``: ``(N,)`` str, why (empty where usable);
        - with ``return_sheared``: ``"g_sheared"`` ``(N, 4, 2)`` on the 1p, 1m, 2p, 2m images (for
          selection responses, ``wlshear.calibration.metacal.selection_response``).

        The ensemble shear is ``<R>^-1 <g>`` (``wlshear.calibration.metacal.ensemble_shear``).
        ``batch_size`` stamps (x 5 images x 8 symmetries) per step: small batches stay in the CPU
        cache (64: ~3x the throughput of 1024 on one core).
        ``seed`` seeds the fixnoise fields (None: fresh ones each call). ``noise_groups``: optional
        ``(N,)`` ints; stamps of one group get the same fixnoise field (for simulations where they
        share their own noise, e.g. the +-g common-noise design).
        """
        op = self.metacal_operator
        if op is None:
            raise ValueError(
                "this estimator carries no metacal settings: train it with `python train.py metacal=default` "
                "(the settings are then saved in estimator_refit.pt), or attach them with "
                "est.set_metacal(wlshear.sim.metacal.MetacalSettings(noise_scale=...))"
            )
        x = _as_stamps(stamps)
        n_pix = op.settings.stamp_size
        size = int(x.shape[-1])
        if x.shape[-2] != size:
            raise ValueError(f"metacal needs square stamps (N, {op.settings.input_size}, {op.settings.input_size}), "
                             f"got {tuple(x.shape)}")
        op.margin_of(size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = tuple(SHEAR_NAMES)  # noshear, 1p, 1m, 2p, 2m
        n = x.shape[0]
        raw = np.full((n, len(names), 2), np.nan)
        x32 = x.float()
        failed, reasons = check_stamps(x32.numpy())  # non-finite, blank, flat, not CLASH counts
        gen = _generator(seed)
        fields = _group_noise(op, noise_groups, n, gen, size)
        self.net.eval()
        with full_precision():
            raw = self._metacal_loop(x32, failed, raw, noise_groups, fields, gen, batch_size, symmetrize, progress)
        d = op.settings.step
        resp = np.empty((n, 2, 2))
        resp[:, :, 0] = (raw[:, 1] - raw[:, 2]) / (2 * d)
        resp[:, :, 1] = (raw[:, 3] - raw[:, 4]) / (2 * d)
        raw[failed] = np.nan
        resp[failed] = np.nan
        if failed.any():
            log.warning("metacal: %d of %d stamps flagged (NaN rows): %s", failed.sum(), n, flag_summary(reasons))
        out = {"g": raw[:, 0].copy(), "R": resp, "failed": failed, "reasons": reasons}
        if return_sheared:
            out["g_sheared"] = raw[:, 1:].copy()
        return out

    def _metacal_loop(self, x32, failed, raw, noise_groups, fields, gen, batch_size, symmetrize, progress):
        """The five network shears per stamp (``raw`` (N, 5, 2)), in batches (see :meth:`metacal`)."""
        op = self.metacal_operator
        names = tuple(SHEAR_NAMES)
        n, n_pix, size = x32.shape[0], op.settings.stamp_size, int(x32.shape[-1])
        dtype = next(self.net.parameters()).dtype
        for s in tqdm(range(0, n, batch_size), desc="metacal", disable=not progress):
            idx = np.arange(s, min(s + batch_size, n))
            idx = idx[~failed[idx]]
            if len(idx) == 0:
                continue
            xb = x32[idx]
            if not op.adds_noise:
                noise = None
            elif fields is not None:
                noise = fields[0][torch.as_tensor(fields[1][idx])]
            else:
                noise = op.sample_noise(len(idx), "cpu", torch.float32, gen, size=size)
            cf = op.counterfactuals(xb, names, noise=noise)  # (B, 5, n, n) float32
            flat = cf.reshape(-1, 1, n_pix, n_pix).to(device=self.device, dtype=dtype)
            if self.normalize:
                flat = normalize_stamps(flat)
            g = _symmetrize(self.net, flat) if symmetrize else self.net(flat)
            raw[idx] = g.double().cpu().numpy().reshape(len(idx), len(names), 2)
        return raw

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
        x = self._stamp_input(stamps)
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

    def _stamp_input(self, stamps) -> np.ndarray:
        """Checked ``(N, H, W)`` array: the network's side, or (counterfactual-input estimators) the
        side plus any margin the metacal operator takes (``MetacalSettings.margin``)."""
        side = getattr(self.net, "stamp_size", None)
        if not self.counterfactual_input or self.metacal_operator is None:
            return stamp_array(stamps, side)
        x = stamp_array(stamps, None)
        self.metacal_operator.margin_of(int(x.shape[-1]))
        return x

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
            "metacal": None if self.metacal_operator is None else _plain(self.metacal_operator.to_dict()),
            "counterfactual_input": self.counterfactual_input,
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
            f"normalize={self.normalize}, surface={self.surface!r}, metacal={self.metacal_operator!r}, "
            f"counterfactual_input={self.counterfactual_input}, device={self.device})"
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


def _as_stamps(stamps: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` tensor from ``(N, H, W)`` / ``(N, 1, H, W)`` arrays, with clear shape errors."""
    if not isinstance(stamps, torch.Tensor):
        stamps = np.asarray(stamps)
        if not stamps.dtype.isnative:
            stamps = stamps.astype(stamps.dtype.newbyteorder("="))
    x = torch.as_tensor(stamps)
    if x.ndim == 2:
        raise ValueError(f"expected a batch of stamps (N, H, W); got one stamp {tuple(x.shape)}: use stamps[None]")
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"stamps must be (N, H, W) or (N, 1, H, W), got shape {tuple(x.shape)}")
    return x


def _group_noise(op, noise_groups, n: int, gen: torch.Generator, size: int | None = None):
    """``op.group_noise`` (one fixnoise field per distinct group, ``(fields, index)``), or None."""
    if noise_groups is None or not op.adds_noise:
        return None
    return op.group_noise(noise_groups, n, generator=gen, size=size)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


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
    """Load a :class:`ShearEstimator` from a file written by :meth:`ShearEstimator.save`, from a
    Lightning checkpoint of a ``ShearRegressor`` (identity calibration, metadata from its hparams),
    or by the name of an estimator shipped with the package (``"clash-parametric"``:
    :mod:`wlshear.models.pretrained`; a file of that name in the working directory wins).

    Raises:
        FileNotFoundError: ``path`` does not exist and is no shipped estimator's name.
        ValueError: the file is corrupt, of an unknown format, or its network cannot be rebuilt.
    """
    from wlshear.models.pretrained import PRETRAINED, pretrained_path

    if isinstance(path, str) and path in PRETRAINED and not Path(path).exists():
        path = pretrained_path(path)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no estimator file at {path} (absolute: {path.resolve()}); train one and save it with "
            "ShearEstimator.save(path), pass a ShearRegressor Lightning checkpoint, or name a shipped "
            f"estimator ({', '.join(sorted(PRETRAINED))})"
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
        metacal = obj.get("metacal")
        counterfactual_input = bool(obj.get("counterfactual_input", False))
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
        metacal = (hp.get("metacal_settings") or None)
        counterfactual_input = metacal is not None
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
                              surface=surface, metacal=metacal, counterfactual_input=counterfactual_input)
    except ValueError as exc:
        raise ValueError(f"{path}: invalid calibration surface: {exc}") from exc
