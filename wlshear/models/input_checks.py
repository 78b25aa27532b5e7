"""What a :class:`~wlshear.models.estimator.ShearEstimator` accepts, and which stamps it flags.

Expected input
--------------
A batch ``(N, 32, 32)`` (or ``(N, 1, 32, 32)``) of stamps, axis 0 = y (row), axis 1 = x (column),
the galaxy centred at pixel (15.5, 15.5), pixel values in **CLASH counts** (zero-point 25.4193:
flux = 10**(-0.4 (mag - 25.4193)); ``docs/CONVENTIONS.md``), background-subtracted, with the
CLASH-like noise of the training (sigma ~3.6e-3 counts/px at full noise, ~9e-4 at noise x0.25).

Because the network sees each stamp normalised to mean 0 and std 1, a stamp's overall scale is
invisible to it: stamps in other units (physical flux densities ~1e-19, electrons of a long
exposure) or stamps with no signal at all would all give a confident answer. Such stamps are
flagged instead (``ShearEstimator.predict`` returns NaN rows for them, ``predict_with_flags``
returns the flags and, with ``return_reasons=True``, the reasons):

- ``non-finite``: a NaN or infinite pixel;
- ``all zero``: every pixel is exactly 0 (e.g. a fully masked or blank region);
- ``flat``: no pixel variation beyond float32 rounding (std <= ``FLAT_RTOL`` x max |pixel|);
- ``scale too small`` / ``scale too large``: the per-stamp pixel standard deviation lies outside
  [``STD_MIN``, ``STD_MAX``] counts.

Each reason string starts with that label and a colon, then the details.

The valid std range: training stamps span about 1e-4 counts (a noiseless, masked COSMOS galaxy
with one pixel above the mask threshold 0.012 x 0.3203) to ~0.5 counts (the brightest COSMOS
galaxies); pure-noise stamps have std ~9e-4 (noise x0.25) to ~3.6e-3 (full noise). ``STD_MIN`` =
1e-5 is 10x below the quietest of them; ``STD_MAX`` = 1e4 is far above any real CLASH galaxy or
star stamp (a mag-12 star has ~1e5 counts in total). Outside that range the stamps are almost
certainly not CLASH counts.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

__all__ = ["STD_MIN", "STD_MAX", "FLAT_RTOL", "stamp_array", "check_stamps", "flag_summary"]

#: smallest per-stamp pixel std [CLASH counts] of a usable stamp
STD_MIN = 1e-5
#: largest per-stamp pixel std [CLASH counts] of a usable stamp
STD_MAX = 1e4
#: a stamp whose std is at most this fraction of its largest |pixel| is flat (float32 rounding)
FLAT_RTOL = 1e-6
_CHUNK = 8192


def stamp_array(stamps, stamp_size: int | None = 32) -> np.ndarray:
    """``stamps`` as a numpy ``(N, H, W)`` array (no copy where possible), with an error that says
    how to fix a wrong shape. ``stamp_size``: the side the network takes (None: any)."""
    x = stamps.detach().cpu().numpy() if isinstance(stamps, torch.Tensor) else np.asarray(stamps)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"stamps must be a numeric array in CLASH counts, got dtype {x.dtype}")
    s = stamp_size
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    elif x.ndim == 4:
        raise ValueError(f"stamps must be (N, H, W) or (N, 1, H, W) (one channel), got shape {x.shape}")
    if x.ndim == 2:
        if s is not None and x.shape == (s, s) or s is None and x.shape[0] == x.shape[1]:
            raise ValueError(f"expected a batch of stamps (N, H, W); got one stamp {x.shape}: use stamps[None]")
        if s is not None and x.shape[1] == s * s:
            raise ValueError(f"expected a batch of stamps (N, {s}, {s}); got a 2-D array {x.shape}: if its rows "
                             f"are flattened stamps, use stamps.reshape(-1, {s}, {s})")
        raise ValueError(f"expected a batch of stamps (N, H, W); got a 2-D array {x.shape}")
    if x.ndim != 3:
        raise ValueError(f"stamps must be (N, H, W) or (N, 1, H, W), got shape {x.shape}")
    if s is not None and x.shape[1:] != (s, s):
        raise ValueError(
            f"this estimator takes {s}x{s}-pixel stamps (0.065\"/px, galaxy centred at ({(s - 1) / 2}, "
            f"{(s - 1) / 2})); got {x.shape[1]}x{x.shape[2]}: cut {s}x{s} stamps centred on the galaxies "
            "(e.g. wlshear.clash.stamps.extract_stamps) rather than resizing them")
    return x


def check_stamps(stamps) -> tuple[np.ndarray, np.ndarray]:
    """``(failed (N,) bool, reasons (N,) object array of str, '' where usable)`` for ``(N, H, W)``
    stamps in CLASH counts (see the module docstring for the tests and the valid range)."""
    x = stamp_array(stamps, None)
    n = len(x)
    failed = np.zeros(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    for s in range(0, n, _CHUNK):
        xb = x[s:s + _CHUNK].reshape(min(_CHUNK, n - s), -1).astype(np.float64)
        finite = np.isfinite(xb).all(axis=1)
        xb = np.where(np.isfinite(xb), xb, 0.0)
        peak = np.abs(xb).max(axis=1, initial=0.0)
        centred = xb - xb[:, :1]  # exact 0 for a flat stamp, as in normalize_stamps
        std = centred.std(axis=1)
        kinds = [  # first match wins, in this order
            (~finite, lambda k: "non-finite: a NaN or infinite pixel"),
            (peak == 0, lambda k: "all zero: blank or fully masked stamp"),
            (std <= FLAT_RTOL * peak, lambda k: "flat: no pixel variation beyond float32 rounding"),
            (std < STD_MIN, lambda k: f"scale too small: pixel std {std[k]:.3g} < {STD_MIN:g} counts, not CLASH "
                                      "counts (physical flux units?)"),
            (std > STD_MAX, lambda k: f"scale too large: pixel std {std[k]:.3g} > {STD_MAX:g} counts, not CLASH counts"),
        ]
        done = np.zeros(len(xb), dtype=bool)
        for mask, text in kinds:
            for k in np.flatnonzero(mask & ~done):
                reasons[s + k] = text(k)
            done |= mask
        failed[s:s + len(xb)] = done
    return failed, reasons


def flag_summary(reasons) -> str:
    """``'all zero: 3, non-finite: 1'``: how many stamps were flagged for each kind of reason."""
    counts = Counter(str(r).split(":")[0] for r in reasons if r)
    return ", ".join(f"{k}: {v}" for k, v in counts.most_common())
