"""The paper authors' released CNN (``wlenet``) as an external shear estimator.

Loads the trained Keras weights of the release (``cnn_image_clash_uniform_mse_lsq*.hdf5``, read
with h5py; Keras itself is not needed) into the project's own ``PaperCNN`` (the paper's Table 2,
``PaperCNN.load_keras_weights``) and runs it through ``ShearEstimator`` in float64:

    input 32x32x1, normalised per stamp (mean 0, std 1)
    conv 5x5 x64, stride 3, valid, ReLU  -> 10x10x64
    conv 1x1 x40, ReLU                   -> 10x10x40
    conv 1x1 x10, ReLU                   -> 10x10x10
    flatten in (row, column, channel) order -> 1000
    dense 100 ReLU, dense 30 ReLU (dropout is inactive at inference), dense 2 -> (g1, g2)

Keras convolutions are cross-correlations with kernels indexed (kh, kw, in, out) = (row, column,
...). The release's stamps are row = y like ours, so our ``(N, 32, 32)`` (y, x) stamps feed the
network directly.

At inference the estimate is averaged over the 8 symmetries of the square (``symmetrize``, the
project's ``wlshear.models.symmetry``). Finally the release's calibration ``calib = (c1, m1, c2,
m2)`` from the matching ``.npy`` is applied as (g - c) / (1 + m) (``calibrate=True``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wlshear.observables import as_stamp_batch

__all__ = ["WLENetEstimator", "default_release_dir", "release_files", "NOISE_LEVELS"]

NOISE_LEVELS = ("1.000", "0.500", "0.250")
_LAYERS = ("conv_1", "conv_2", "conv_3", "dense_1", "dense_2", "label_pred")


def default_release_dir() -> Path:
    """``<repo root>/../shared/data/wlenet_release`` (the read-only shared data location)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wlenet_release"


def release_files(directory, noise_level: str = "1.000") -> tuple[Path, Path]:
    """Paths of the (weights .hdf5, calibration .npy) files for a noise level."""
    level = _check_level(noise_level)
    stem = "cnn_image_clash_uniform_mse_lsq"
    if level != "1.000":
        stem += f"_noise_{level}"
    d = Path(directory)
    return d / f"{stem}.hdf5", d / f"{stem}.npy"


def _check_level(noise_level) -> str:
    if isinstance(noise_level, (float, int)):
        noise_level = f"{float(noise_level):.3f}"
    if noise_level not in NOISE_LEVELS:
        raise ValueError(f"noise_level must be one of {NOISE_LEVELS}, got {noise_level!r}")
    return noise_level


class WLENetEstimator:
    """The released wlenet CNN with the common estimator interface.

    Parameters
    ----------
    path_or_dir : the release directory or a ``.hdf5`` weights file; None = the shared data
        location (:func:`default_release_dir`).
    noise_level : ``'1.000'`` (full CLASH noise), ``'0.500'`` or ``'0.250'``; ignored when a file
        is given.
    symmetrize : average over the 8 symmetries of the square (release default).
    calibrate : apply the release's calibration (g - c) / (1 + m) from the matching ``.npy``.
    """

    name = "wlenet"

    def __init__(self, path_or_dir=None, noise_level: str = "1.000", symmetrize: bool = True,
                 calibrate: bool = True):
        p = default_release_dir() if path_or_dir is None else Path(path_or_dir)
        if p.suffix == ".hdf5":
            weights, calib = p, p.with_suffix(".npy")
        else:
            weights, calib = release_files(p, noise_level)
        if not weights.is_file():
            raise FileNotFoundError(
                f"wlenet weights not found: expected {weights} (and calibration {calib.name}). "
                "Point path_or_dir at the authors' release directory (shared/data/wlenet_release) "
                "holding cnn_image_clash_uniform_mse_lsq[_noise_0.500|_noise_0.250].hdf5 and .npy."
            )
        if calibrate and not calib.is_file():
            raise FileNotFoundError(
                f"wlenet calibration file not found: expected {calib} next to {weights.name} "
                "(or pass calibrate=False)."
            )
        self.weights_path = weights
        self.calib_path = calib if calibrate else None
        self.symmetrize = bool(symmetrize)
        self.params = self._load_weights(weights)
        self.calib = self._load_calib(calib) if calibrate else (0.0, 0.0, 0.0, 0.0)
        self.estimator = self._build_estimator(self.params, self.calib)

    @staticmethod
    def _load_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        try:
            import h5py
        except ImportError as exc:  # pragma: no cover
            raise ImportError("WLENetEstimator needs h5py (`pip install h5py`).") from exc
        params = {}
        with h5py.File(path, "r") as f:
            for name in _LAYERS:
                try:
                    grp = f[name][name]
                    kernel = np.asarray(grp["kernel:0"], dtype=np.float64)
                    bias = np.asarray(grp["bias:0"], dtype=np.float64)
                except KeyError as exc:
                    raise ValueError(
                        f"{path}: missing dataset {name}/{name}/kernel:0 or bias:0; not a wlenet "
                        "cnn_image weights file"
                    ) from exc
                params[name] = (kernel, bias)
        expected = {"conv_1": (5, 5, 1, 64), "conv_2": (1, 1, 64, 40), "conv_3": (1, 1, 40, 10),
                    "dense_1": (1000, 100), "dense_2": (100, 30), "label_pred": (30, 2)}
        for name, shape in expected.items():
            if params[name][0].shape != shape:
                raise ValueError(f"{path}: {name} kernel has shape {params[name][0].shape}, "
                                 f"expected {shape} (paper Table 2 architecture)")
        return params

    @staticmethod
    def _load_calib(path: Path) -> tuple[float, float, float, float]:
        spec = np.load(path, allow_pickle=True).item()
        c1, m1, c2, m2 = (float(v) for v in spec["calib"])
        return c1, m1, c2, m2

    @staticmethod
    def _build_estimator(params, calib):
        """The released weights in the project's PaperCNN (float64), with the release calibration."""
        from wlshear.models.architectures import PaperCNN
        from wlshear.models.estimator import ShearEstimator

        net = PaperCNN().double()
        net.load_keras_weights([a for name in _LAYERS for a in params[name]])
        c1, m1, c2, m2 = calib
        return ShearEstimator(net, calibration={"m1": m1, "c1": c1, "m2": m2, "c2": c2})

    def estimate(self, stamps, batch_size: int = 256):
        """Shear estimates ``(N, 2)`` and ``failed`` ``(N,)`` for ``(N, 32, 32)`` stamps (y, x).

        A stamp fails (NaN row) when it has non-finite pixels or zero standard deviation.
        """
        arr = as_stamp_batch(stamps)
        if arr.shape[1:] != (32, 32):
            raise ValueError(f"wlenet takes 32x32 stamps, got {arr.shape[1:]}")
        finite = np.all(np.isfinite(arr), axis=(1, 2))
        arr = np.where(finite[:, None, None], arr, 0.0)
        ok = finite & (arr.std(axis=(1, 2)) > 0)
        g = self.estimator.predict(arr, symmetrize=self.symmetrize, batch_size=batch_size)
        g[~ok] = np.nan
        return g, ~ok

    def __repr__(self) -> str:
        return f"WLENetEstimator({str(self.weights_path)!r}, symmetrize={self.symmetrize})"
