"""Checks between keys of the entry points' configs (train.py, evaluate.py, infer_clash.py and the
command-line tasks): each relation is ``(keys, check)``; a check takes a getter ``get(key)`` and
returns a message or None. The single-key types and ranges are in :mod:`wlshear.tasks.rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wlshear.utils.validate import MISSING, even_when, parity

__all__ = ["RELATIONS", "RENDER_RELATIONS", "MOCK_FIELD_RELATIONS", "NOISE_KERNEL_RELATIONS",
           "FIT_SURFACE_RELATIONS"]


def _same_stamp_size(get: Callable[[str], Any]) -> str | None:
    a, b = get("data.stamp_size"), get("model.net.stamp_size")
    if a is MISSING or a is None or get("model") is MISSING:
        return None
    b = 32 if b is MISSING or b is None else b
    if a != b:
        return (f"data.stamp_size = {a} but the network takes {b}x{b} stamps (model.net.stamp_size = {b}); "
                "set both to the same value")
    return None


def _sizes_vs_groups(get: Callable[[str], Any]) -> str | None:
    k, b = get("data.group_size"), get("data.batch_size")
    if k is MISSING or b is MISSING or not isinstance(k, int) or not isinstance(b, int):
        return None
    if b < k:
        return f"data.batch_size = {b} is smaller than data.group_size = {k}; a batch must hold at least one group"
    return None


def _lens_behind(get: Callable[[str], Any]) -> str | None:
    zl, zs = get("mock.z_lens"), get("mock.z_source")
    if isinstance(zl, (int, float)) and isinstance(zs, (int, float)) and zs <= zl:
        return f"mock.z_source = {zs} must be beyond mock.z_lens = {zl}"
    return None


def _matched_has_catalog(get: Callable[[str], Any]) -> str | None:
    if get("population") == "matched" and get("data.target_catalog") in (None, MISSING):
        return "population = 'matched' needs data.target_catalog (a (mag, hlr_px) table)"
    return None


#: checks between keys of train.py, evaluate.py and infer_clash.py configs: (keys, check); a check
#: returns a message or None, and is skipped when one of its keys already broke its own rule (keys
#: absent from a config read as MISSING and pass)
RELATIONS: tuple[tuple[tuple[str, ...], Callable[[Callable[[str], Any]], str | None]], ...] = (
    (("data.stamp_size", "model.net.stamp_size"), _same_stamp_size),
    (("data.group_size", "data.batch_size"), _sizes_vs_groups),
    (("data.test_size", "data.test_ring"), even_when("data.test_size", "data.test_ring")),
    (("test.n", "test.ring"), even_when("test.n", "test.ring")),
)
RENDER_RELATIONS = (
    (("n", "ring"), even_when("n", "ring")),
    (("population", "data.target_catalog"), _matched_has_catalog),
)
MOCK_FIELD_RELATIONS = ((("mock.z_lens", "mock.z_source"), _lens_behind),)
NOISE_KERNEL_RELATIONS = ((("size",), parity("size", odd=True, why="the kernel has a centre pixel")),)
FIT_SURFACE_RELATIONS = ((("surface.n",), parity("surface.n", odd=False, why="the fitting set is made of ring pairs")),)
