"""Helpers shared by the Hydra entry points (train.py, evaluate.py, infer_clash.py) and by the
command-line tasks, which compose the same ``conf/`` with Hydra's compose API:
``python -m wlshear.tasks.<name> key=value ...`` (:func:`run_cli`)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from wlshear.utils.validate import missing_message, problems

log = logging.getLogger(__name__)

#: the repository's config directory (the package is installed editable from the repository)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with Hydra overrides (``key=value``, ``group=option``),
    as the Hydra entry points compose theirs; ``paths.root_dir`` is ``$PROJECT_ROOT`` or ``.``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # a previous compose in this process (tests, notebooks)
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def run_cli(config_name: str, task: Callable[[DictConfig], int | None], rules, relations=(), argv=None,
            example: str = "", doc: str = "") -> int:
    """The command line of a task: compose ``conf/<config_name>.yaml`` with the arguments (Hydra
    overrides), check it against ``rules`` / ``relations`` and run ``task(cfg)``.

    ``-h`` / ``--help`` prints ``doc`` and the composed defaults. A bad override, an unset mandatory
    value (``???``) or a value that breaks its rule prints ``error: ...`` on stderr and returns 2
    before any work starts. Returns the task's exit status (0 when it returns None).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        cfg = compose_config(config_name)
        print(f"{doc.strip()}\n\nconfig (conf/{config_name}.yaml; override any key as key=value):\n")
        print(OmegaConf.to_yaml(cfg))
        return 0
    try:
        cfg = compose_config(config_name, argv)
    except Exception as exc:  # Hydra's override / composition errors name the bad argument
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    msgs = [m for m in [missing_message(cfg, example)] if m] + problems(cfg, rules, relations)
    if msgs:
        print("error: invalid arguments (fix them on the command line):\n  " + "\n  ".join(msgs), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(task(cfg) or 0)


def cli_main(config_name: str, task: Callable[[DictConfig], int | None], rules, relations=(), example: str = "",
             doc: str = "") -> Callable[..., int]:
    """``main(argv=None) -> exit status`` of a command-line task (:func:`run_cli` with these settings)."""
    def main(argv=None) -> int:
        return run_cli(config_name, task, rules, relations, argv, example=example, doc=doc)
    main.__doc__ = doc
    return main
