"""Per-stamp normalisation: subtract the stamp's mean pixel value and divide by its standard deviation.

This is the network input convention of Springer et al. (2018). It makes the CNN exactly blind to a
constant background offset and to the overall flux scale of a stamp (counts -> dimensionless).

The statistics are taken over the last two axes (y, x) of each stamp; the standard deviation is the
population one (``ddof = 0``). A flat stamp has std 0: the denominator is clamped to ``eps``
(default ``1e-12`` in the stamp's units, counts), so the numerator ``x - mean`` gives an all-zero
stamp instead of NaN. To make the numerator *exactly* zero for a flat stamp despite floating-point
rounding of the mean (e.g. 1024 float32 copies of 0.1 need not average to exactly 0.1), each stamp is
first shifted by its corner pixel ``x[..., 0, 0]`` (exact for a flat stamp, mathematically a no-op
otherwise) and only then mean-subtracted. Non-finite pixels (NaN / inf) propagate to NaN in
the whole normalised stamp; callers flag such stamps as failures.
"""

from __future__ import annotations

import torch

__all__ = ["normalize_stamps", "DEFAULT_EPS"]

#: Lower bound on the per-stamp standard deviation (stamp units, counts) used as the divisor.
DEFAULT_EPS = 1e-12


def normalize_stamps(x: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Normalise every stamp of ``x`` (shape ``(..., H, W)``) to zero mean and unit std.

    Args:
        x: stamps in counts, any leading batch/channel axes; float tensor.
        eps: minimum divisor; flat stamps (std 0) map to all zeros.

    Returns:
        Tensor of the same shape and dtype, dimensionless.
    """
    if x.ndim < 2:
        raise ValueError(f"stamps need at least 2 axes (..., H, W), got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.float()
    shifted = x - x[..., :1, :1]  # exactly 0 for a flat stamp
    centred = shifted - shifted.mean(dim=(-2, -1), keepdim=True)
    std = centred.square().mean(dim=(-2, -1), keepdim=True).sqrt()
    return centred / std.clamp_min(eps)
