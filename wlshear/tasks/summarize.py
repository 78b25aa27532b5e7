"""Summarise a Hydra multirun of train.py: one row per job, a CSV, a Markdown table and a plot.

    python -m wlshear.tasks.summarize dir=outputs/train/multiruns/<stamp>
    python -m wlshear.tasks.summarize dir=<dir> group_by=model x=data.noise_scale out=<dir>/summary

Composes ``conf/summarize.yaml``.

Each job directory (``<dir>/<job num>/``) is read for ``metrics.json`` (written by train.py at the
end of a job), ``config_resolved.yaml`` and ``.hydra/overrides.yaml`` / ``.hydra/hydra.yaml``
(the config-group choices, e.g. ``model: wide_cnn``). Jobs without ``metrics.json`` are listed
with status ``incomplete`` (crashed, still running or not rank 0), never silently dropped.

Columns: job, status, overrides, model (config-group choice, else the network class), experiment,
noise_scale, source, val_mse, and the test-set summary m1, m2, c1, c2, sigma1, sigma2 (the refit,
symmetrised and calibrated estimator when refit was enabled), plus their component averages
``m = (m1 + m2) / 2`` and ``sigma = sqrt((sigma1^2 + sigma2^2) / 2)``.

The plot (``summary.png``) shows sigma and m against the noise level (the ``x`` column, default
``noise_scale``, i.e. the multiple of the CLASH background noise kernel) with one line per
architecture (``group_by``, default ``model``).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import yaml

from omegaconf import DictConfig

from wlshear.metrics.plots import plot_summary
from wlshear.tasks.rules import SUMMARIZE_RULES
from wlshear.utils.hydra import cli_main


#: ``python -m wlshear.tasks.summarize key=value ...``
main = cli_main("summarize", lambda cfg: summarize_task(cfg), SUMMARIZE_RULES, (),
                example="python -m wlshear.tasks.summarize dir=outputs/train/multiruns/<stamp>", doc=__doc__)


SUMMARY_KEYS = ("m1", "m2", "c1", "c2", "sigma1", "sigma2")
COLUMNS = ("job", "status", "overrides", "model", "net", "experiment", "noise_scale", "source",
           "val_mse", *SUMMARY_KEYS, "m", "sigma", "epochs", "wall_time_s", "run_dir")


def _load_yaml(path: Path):
    if not path.is_file():
        return None
    with open(path) as fh:
        return yaml.safe_load(fh)


def _get(d, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def find_jobs(root: Path) -> list[Path]:
    """Job directories under ``root``: those holding ``metrics.json`` or a ``.hydra`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass a multirun dir such as "
                                "outputs/train/multiruns/<timestamp>")
    jobs = {p.parent for p in root.rglob("metrics.json")}
    jobs |= {p.parent for p in root.rglob(".hydra") if p.is_dir() and (p / "overrides.yaml").is_file()}
    jobs = {j for j in jobs if ".submitit" not in j.parts and j.name != "wandb"}

    def key(p: Path):
        rel = p.relative_to(root).parts
        return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in rel)

    return sorted(jobs, key=key)


def read_job(job: Path, root: Path) -> dict:
    """One summary row for a job directory."""
    metrics = None
    if (job / "metrics.json").is_file():
        metrics = json.loads((job / "metrics.json").read_text())
    cfg = _load_yaml(job / "config_resolved.yaml") or {}
    overrides = _load_yaml(job / ".hydra" / "overrides.yaml") or []
    hydra_cfg = _load_yaml(job / ".hydra" / "hydra.yaml") or {}
    choices = _get(hydra_cfg, "hydra.runtime.choices") or {}

    net_target = _get(cfg, "model.net._target_")
    net = net_target.rsplit(".", 1)[-1] if net_target else None
    src = _get(cfg, "data.source._target_")
    row = {
        "job": str(job.relative_to(root)) if job != root else ".",
        "status": "ok" if metrics is not None else "incomplete",
        "overrides": " ".join(str(o) for o in overrides),
        "model": choices.get("model") or net,
        "net": net,
        "experiment": choices.get("experiment"),
        "noise_scale": _get(cfg, "data.noise_scale"),
        "source": choices.get("data/source") or (src.rsplit(".", 1)[-1] if src else None),
        "run_dir": str(job),
    }
    if metrics is not None:
        row["val_mse"] = metrics.get("val_mse")
        summ = metrics.get("summary") or {}
        for k in SUMMARY_KEYS:
            row[k] = summ.get(k)
        m1, m2, s1, s2 = (row.get(k) for k in ("m1", "m2", "sigma1", "sigma2"))
        row["m"] = 0.5 * (m1 + m2) if None not in (m1, m2) else None
        row["sigma"] = math.sqrt(0.5 * (s1 * s1 + s2 * s2)) if None not in (s1, s2) else None
        row["epochs"] = metrics.get("epochs_completed")
        row["wall_time_s"] = metrics.get("wall_time_s")
    for extra in overrides:  # every swept key also as its own column (e.g. model.optimizer.lr)
        if isinstance(extra, str) and "=" in extra:
            k, v = extra.split("=", 1)
            k = k.lstrip("+~")
            if k not in row:
                row[k] = v
    return row


def summarize(root: Path, out: Path | None = None, group_by: str = "model", x: str = "noise_scale",
              plot: bool = True) -> dict[str, Path]:
    """Write ``<out>.csv``, ``<out>.md`` and (``plot``) ``<out>.png``; returns their paths."""
    root = Path(root)
    jobs = find_jobs(root)
    if not jobs:
        raise FileNotFoundError(f"no job directories (metrics.json or .hydra/overrides.yaml) under {root}")
    rows = [read_job(j, root) for j in jobs]
    out = Path(out) if out is not None else root / "summary"
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))

    paths = {"csv": out.with_suffix(".csv"), "md": out.with_suffix(".md")}
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})

    md_cols = [c for c in ("job", "status", "model", "experiment", "noise_scale", "val_mse", "m1", "m2",
                           "c1", "c2", "sigma1", "sigma2") if any(r.get(c) is not None for r in rows)]

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = [f"# Multirun summary: {root}", "", f"{len(rows)} job(s), "
             f"{sum(r['status'] == 'ok' for r in rows)} complete. m, c, sigma: test set "
             "(calibrated, symmetrised estimator); val_mse: trained net on the validation set.", "",
             "| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in md_cols) + " |" for r in rows]
    paths["md"].write_text("\n".join(lines) + "\n")

    if plot:
        paths["png"] = plot_summary(rows, out.with_suffix(".png"), group_by=group_by, x=x)
    return paths


def summarize_task(cfg: DictConfig) -> int:
    try:
        paths = summarize(Path(cfg.dir), Path(cfg.out) if cfg.out else None, group_by=str(cfg.group_by), x=str(cfg.x),
                          plot=bool(cfg.plot))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    for kind, p in paths.items():
        print(f"wrote {kind}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
