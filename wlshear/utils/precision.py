"""Float32 matmul precision for measurements.

``torch.set_float32_matmul_precision("medium")`` (what training uses for speed) lets float32
matrix products run in bfloat16 on CPUs with AMX/AVX512-BF16 and in TF32 on GPUs: relative errors of
~2e-3 (measured on this project's CPU machine). That is harmless for gradient steps but not for
metacalibration, whose responses are differences of images sheared by +-0.01: on the parametric
test set it moved the metacal m by several percent. Measurements therefore run at full precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["full_precision"]


@contextmanager
def full_precision() -> Iterator[None]:
    """Run the block with ``torch.get_float32_matmul_precision() == "highest"``, then restore."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
