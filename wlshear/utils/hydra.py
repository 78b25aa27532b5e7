"""Helpers shared by the Hydra entry points (train.py, evaluate.py, infer_clash.py)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def set_project_root() -> str:
    """Set ``$PROJECT_ROOT`` (what ``paths.root_dir`` reads) to the current directory unless it is set.

    Called by the entry points (train.py, evaluate.py, infer_clash.py) before Hydra starts, so that
    ``python train.py`` from the repository root writes to ``<repo>/outputs`` and caches stamps in
    ``<repo>/data_cache``. The root cannot come from ``${hydra:runtime.cwd}``: sweepers and launchers
    (basic, joblib, submitit, optuna) resolve ``hydra.sweep.dir`` (under ``paths.log_dir``) before any
    job exists, when Hydra's runtime values are not yet set. Child processes (joblib workers, DDP
    ranks, SLURM jobs) inherit the variable, so every job of a sweep uses the same absolute root.
    Returns the root in effect.
    """
    return os.environ.setdefault("PROJECT_ROOT", os.getcwd())


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict of ``_target_`` configs (callbacks, loggers)."""
    from hydra.utils import instantiate

    out = []
    if not cfg:
        return out
    if not isinstance(cfg, DictConfig):
        raise TypeError("callbacks/logger config must be a mapping of name -> {_target_: ...}")
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("instantiating %s <%s>", name, conf._target_)
            out.append(instantiate(conf))
    return out


def print_config_tree(cfg: DictConfig, order=("data", "model", "callbacks", "logger", "trainer", "paths"),
                      save_to: Path | None = None) -> None:
    """Print the resolved config as a rich tree (and save the same text)."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        group = cfg[key]
        text = OmegaConf.to_yaml(group, resolve=True) if isinstance(group, DictConfig) else str(group)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        with open(save_to, "w") as fh:
            rich.print(tree, file=fh)


def save_resolved_config(cfg: DictConfig, out_dir: Path) -> Path:
    """Write the fully resolved config of this run as YAML into the run directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config_resolved.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def write_json(obj: Any, path: Path) -> Path:
    """JSON of ``obj`` converted to plain types (``to_plain``); non-finite floats become null."""
    import math

    from wlshear.utils.plain import to_plain

    def finite(o):
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, list):
            return [finite(v) for v in o]
        return None if isinstance(o, float) and not math.isfinite(o) else o

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(to_plain(obj)), indent=2))
    return path
