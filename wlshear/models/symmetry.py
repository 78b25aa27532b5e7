"""The 8 symmetries of the square (dihedral group D4) acting on stamps, and how shear transforms.

Stamps are ``(..., H, W)`` arrays/tensors with axis -2 = y (row) and axis -1 = x (column). Element
``k`` in ``0..7`` is: optionally a transpose (x <-> y) when ``k >= 4``, followed by ``k % 4``
quarter-turns (``rot90`` over the last two axes).

Shear transformation under each element (``docs/CONVENTIONS.md``):

- transpose:           g1 -> -g1, g2 -> g2
- flip of one axis:    g1 -> g1,  g2 -> -g2   (a transpose followed by an odd number of quarter-turns)
- quarter-turn:        g1 -> -g1, g2 -> -g2
- half-turn:           unchanged

so ``shear_sign(k) = (s1, s2)`` with ``s2 = (-1)^(k % 4)`` and ``s1 = s2 * (-1 if k >= 4 else 1)``.
Every transformation's sign pattern is its own inverse, so ``g(T x) = s_T * g(x)`` maps both ways.

:func:`symmetrize` averages a shear estimator over the group,
``f_sym(x) = (1/8) sum_T s_T * f(T x)``, which is exactly equivariant:
``f_sym(T x) = s_T * f_sym(x)`` for every ``T`` (up to floating-point summation order).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "N_SYMMETRIES",
    "apply",
    "apply_np",
    "shear_sign",
    "shear_signs",
    "transform_shear",
    "symmetrize",
]

N_SYMMETRIES = 8


def _check_k(k: int) -> int:
    k = int(k)
    if not 0 <= k < N_SYMMETRIES:
        raise ValueError(f"symmetry index must be in 0..7, got {k}")
    return k


def apply(x: torch.Tensor, k: int) -> torch.Tensor:
    """Apply symmetry ``k`` (0..7) to the last two axes (y, x) of ``x``."""
    k = _check_k(k)
    if x.ndim < 2:
        raise ValueError(f"need at least 2 axes (..., H, W), got shape {tuple(x.shape)}")
    if k >= 4:
        x = x.transpose(-2, -1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def apply_np(x: np.ndarray, k: int) -> np.ndarray:
    """NumPy version of :func:`apply` (returns a view where possible)."""
    k = _check_k(k)
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"need at least 2 axes (..., H, W), got shape {x.shape}")
    if k >= 4:
        x = np.swapaxes(x, -2, -1)
    return np.rot90(x, k % 4, axes=(-2, -1))


def shear_sign(k: int) -> tuple[int, int]:
    """Signs ``(s1, s2)`` with which (g1, g2) change under symmetry ``k``."""
    k = _check_k(k)
    s2 = -1 if (k % 4) % 2 else 1
    s1 = -s2 if k >= 4 else s2
    return s1, s2


def shear_signs() -> np.ndarray:
    """All sign pairs as an ``(8, 2)`` float array (row ``k`` = :func:`shear_sign` ``(k)``)."""
    return np.array([shear_sign(k) for k in range(N_SYMMETRIES)], dtype=np.float64)


def transform_shear(g: torch.Tensor | np.ndarray, k: int) -> torch.Tensor | np.ndarray:
    """Shear ``(..., 2)`` of the transformed image, given the shear ``g`` of the original image."""
    s1, s2 = shear_sign(k)
    if isinstance(g, torch.Tensor):
        return g * g.new_tensor([s1, s2])
    g = np.asarray(g)
    return g * np.array([s1, s2], dtype=g.dtype if np.issubdtype(g.dtype, np.floating) else np.float64)


def symmetrize(model_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Group-averaged estimate ``(1/8) sum_k s_k * model_fn(apply(x, k))``.

    Args:
        model_fn: maps stamps shaped like ``x`` (``(B, ..., H, W)``) to shears ``(B, 2)``.
        x: stamps; only the last two axes are transformed. Square stamps are required.

    Returns:
        ``(B, 2)`` exactly equivariant shear estimate. The 8 transformed copies are evaluated one
        after another (not concatenated), so memory use is that of a single ``model_fn`` call.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"symmetry averaging needs square stamps, got shape {tuple(x.shape)}")
    total = None
    for k in range(N_SYMMETRIES):
        out = transform_shear(model_fn(apply(x, k).contiguous()), k)
        total = out if total is None else total + out
    return total / N_SYMMETRIES
