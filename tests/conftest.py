"""Shared fixtures: paths to ../shared data (tests skip with a reason when it is absent), and a fresh
copy of the repository with a user's environment for tests that run commands as a user types them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wlshear.sim.constants import FAST_GSPARAMS  # noqa: F401 - re-exported for the tests

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WLSHEAR_SHARED", REPO.parent / "shared")).resolve()


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


# never part of a fresh clone: build and run products (as in .gitignore) and git's own data
_NOT_IN_A_CLONE = {".git", ".venv", "outputs", "multirun", "data_cache", "logs", "wandb", "lightning_logs",
                   ".cache", ".pytest_cache", "__pycache__"}


def copy_repo(dest: Path) -> Path:
    """Copy the working tree to ``dest`` as a fresh clone would have it: the files git tracks or would
    track (untracked but not ignored, so uncommitted work is tested too), without outputs/,
    data_cache/, .venv/ or caches. Without git, every file outside those directories."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not _NOT_IN_A_CLONE & set(p.relative_to(REPO).parts)]
    for f in files:
        src = REPO / f
        if src.is_file():  # listed but deleted in the working tree: not copied
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def user_env(home: Path) -> dict:
    """The environment of a user who ran ``. .venv/bin/activate``: this interpreter's bin directory
    first on PATH, no PROJECT_ROOT / PYTHONPATH / HYDRA_* of ours; wandb offline, one BLAS thread
    (the machine's cores are shared by the test run), full Hydra tracebacks."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROJECT_ROOT", "PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("HYDRA_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = sys.prefix
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(home), WANDB_CONFIG_DIR=str(home / "wandb"),
               MPLBACKEND="Agg", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    return env
