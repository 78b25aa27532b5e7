"""Shared fixtures: paths to ../shared data (tests skip with a reason when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WLSHEAR_SHARED", REPO.parent / "shared")).resolve()
FAST_GSPARAMS = dict(minimum_fft_size=64, folding_threshold=1e-2, maxk_threshold=3e-3)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared data directory is absent on this machine)")
    return path


@pytest.fixture
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture
def cosmos_real_dir() -> Path:
    return _need(SHARED / "data" / "cosmos_real_100")


@pytest.fixture
def cosmos_param_dir() -> Path:
    return _need(SHARED / "data" / "cosmos_example_23.5")


@pytest.fixture
def wlenet_dir() -> Path:
    return _need(SHARED / "data" / "wlenet_release")
