"""evaluate.py's estimators: the CNN files, the configured baselines, and running them all on one
set of stamps.

- :func:`resolve_checkpoints` / :func:`load_cnns`: estimator files (a train.py run directory adds
  ``cnn`` = estimator.pt and ``cnn_refit`` = estimator_refit.pt);
- :func:`build_baselines`: the ``baselines`` config (``conf/baselines/*.yaml``, by ``_target_``);
- :func:`run_estimators`: every CNN (with and without the symmetry average) and baseline on the
  same stamps, as :class:`EstimateResult` (a crashing baseline is recorded, never dropped);
- :func:`summaries`: m, c, sigma (with bootstrap errors) of each result;
- :func:`config_mismatch`: differences between an estimator's training data and the test data.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from wlshear.metrics.bias import bias_summary
from wlshear.models.estimator import load_estimator

log = logging.getLogger(__name__)

__all__ = ["resolve_checkpoints", "load_cnns", "build_baselines", "noise_dependent", "EstimateResult", "cnn_rows",
           "run_estimators", "summaries", "config_mismatch"]

#: baseline options the task fills at run time when the config leaves them null
RUNTIME_OPTIONS = ("noise_sigma", "noise_level")


def resolve_checkpoints(checkpoints=None, run_dir=None) -> dict[str, Path]:
    """Estimator name -> file. ``run_dir`` (a train.py run directory) adds ``cnn`` =
    ``estimator.pt`` and, when present, ``cnn_refit`` = ``estimator_refit.pt``.

    Raises FileNotFoundError naming every missing file (and ``ValueError`` when there is none).
    """
    out: dict[str, Path] = {}
    if run_dir:
        rd = Path(str(run_dir)).expanduser()
        if not rd.is_dir():
            raise FileNotFoundError(f"run_dir {rd} (absolute: {rd.resolve()}) is not a directory; "
                                    "pass the directory train.py wrote (it holds estimator.pt)")
        plain, refit = rd / "estimator.pt", rd / "estimator_refit.pt"
        if not plain.is_file() and not refit.is_file():
            raise FileNotFoundError(f"run_dir {rd} holds neither {plain.name} nor {refit.name}; "
                                    "is it a finished train.py run?")
        if plain.is_file():
            out["cnn"] = plain
        if refit.is_file():
            out["cnn_refit"] = refit
    for name, path in dict(checkpoints or {}).items():
        if path is None:
            continue
        out[str(name)] = Path(str(path)).expanduser()
    for name, path in out.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {name!r}: no estimator file at {path} (absolute: {path.resolve()}); "
                "give the estimator.pt / estimator_refit.pt that train.py wrote, or a Lightning .ckpt"
            )
    return out


def load_cnns(paths: dict[str, Path], weights_only: bool = True) -> dict:
    """Load every estimator file (``load_estimator``: ShearEstimator files or Lightning .ckpt).

    ``weights_only=False`` lets torch unpickle arbitrary objects: only for files you trust.
    """
    out = {}
    for name, path in paths.items():
        est = load_estimator(path, weights_only=weights_only)
        log.info("loaded %s from %s (%s; calibration %s)", name, path, type(est.net).__name__,
                 {k: round(v, 5) for k, v in est.calibration.items()})
        out[name] = est
    return out


def _spec(conf) -> dict:
    return OmegaConf.to_container(conf, resolve=True) if isinstance(conf, DictConfig) else dict(conf or {})


def noise_dependent(specs: Mapping) -> list[str]:
    """Names of the configured baselines built for a noise level (an option left null in
    :data:`RUNTIME_OPTIONS`): evaluate's noise study rebuilds them at every level."""
    return [str(n) for n, c in (specs or {}).items() if any(k in _spec(c) and _spec(c)[k] is None for k in RUNTIME_OPTIONS)]


def build_baselines(specs: Mapping, noise_sigma=None, noise_level: str = "1.000", names=None):
    """Instantiate the configured baselines (name -> ``{_target_: class, **options}``); returns
    ``(name -> estimator, name -> skip reason)``.

    Run-time options left null: ``noise_sigma`` becomes the stamps' noise sigma [counts] (dropped,
    i.e. the class default, when ``noise_sigma`` is None), ``noise_level`` the level string. A
    baseline whose dependency (anacal) or files (wlenet release) are missing is skipped with the
    reason recorded. ``names``: only these, in this order (default: all, in config order).
    """
    built, skipped = {}, {}
    specs = {str(k): v for k, v in (specs or {}).items()}
    for name in (specs if names is None else [n for n in names if n in specs]):
        kw = _spec(specs[name])
        if "noise_sigma" in kw and kw["noise_sigma"] is None:
            if noise_sigma is None:
                kw.pop("noise_sigma")
            else:
                kw["noise_sigma"] = float(noise_sigma)
        if "noise_level" in kw and kw["noise_level"] is None:
            kw["noise_level"] = noise_level
        try:
            built[name] = get_class(kw.pop("_target_"))(**kw)
        except (ImportError, FileNotFoundError, ValueError) as err:
            skipped[name] = f"{type(err).__name__}: {err}"
            log.warning("skipping baseline %s: %s", name, skipped[name])
    return built, skipped


@dataclass
class EstimateResult:
    """Output of one estimator on one set: (N, 2) shears (NaN where failed), (N,) failure flags,
    wall time [s], kind ('cnn' or 'baseline') and an error message if the estimator crashed."""

    g: np.ndarray
    failed: np.ndarray
    seconds: float
    kind: str
    error: str | None = None
    info: dict = field(default_factory=dict)


def cnn_rows(cnns: dict, symmetrize) -> list[tuple[str, str, bool]]:
    """(row name, estimator name, symmetrize?) for every CNN and averaging choice."""
    rows = []
    for name in cnns:
        for sym in symmetrize:
            rows.append((f"{name}_sym" if sym else name, name, bool(sym)))
    return rows


def run_estimators(stamps: np.ndarray, cnns: dict, baselines: dict, symmetrize=(False, True),
                   batch_size: int = 256, chunk: int = 2000, progress: bool = True,
                   desc: str = "") -> dict[str, EstimateResult]:
    """Run every CNN variant and baseline on the same stamps ``(N, 32, 32)``.

    A baseline that raises is recorded with ``error`` set and every row failed (never dropped).
    """
    stamps = np.ascontiguousarray(stamps, dtype=np.float32)
    n = len(stamps)
    out: dict[str, EstimateResult] = {}
    jobs = [("cnn", row, est, sym) for row, est, sym in cnn_rows(cnns, symmetrize)]
    jobs += [("baseline", name, name, None) for name in baselines]
    for kind, row, key, sym in tqdm(jobs, desc=f"estimators {desc}".strip(), disable=not progress):
        t0 = time.perf_counter()
        if kind == "cnn":
            g, failed = cnns[key].predict_with_flags(stamps, symmetrize=sym, batch_size=batch_size)
            res = EstimateResult(g, failed, 0.0, kind)
        else:
            est = baselines[key]
            try:
                if getattr(est, "whole_batch", False) or n <= chunk:
                    g, failed = est.estimate(stamps)
                else:
                    parts = [est.estimate(stamps[s:s + chunk]) for s in
                             tqdm(range(0, n, chunk), desc=key, leave=False, disable=not progress)]
                    g = np.concatenate([p[0] for p in parts])
                    failed = np.concatenate([p[1] for p in parts])
                g = np.asarray(g, dtype=np.float64)
                failed = np.asarray(failed, dtype=bool) | ~np.all(np.isfinite(g), axis=1)
                res = EstimateResult(g, failed, 0.0, kind)
            except Exception as err:  # recorded, shown in the table as all failed
                log.error("baseline %s crashed on %d stamps: %s\n%s", key, n, err, traceback.format_exc())
                res = EstimateResult(np.full((n, 2), np.nan), np.ones(n, bool), 0.0, kind,
                                     error=f"{type(err).__name__}: {err}")
        res.g = np.where(res.failed[:, None], np.nan, res.g)
        res.seconds = time.perf_counter() - t0
        out[row] = res
        log.info("%-16s %d stamps in %.1f s (%.0f stamps/s), %d failed", row, n, res.seconds,
                 n / max(res.seconds, 1e-9), int(res.failed.sum()))
    return out


def summaries(g_true, res: dict[str, EstimateResult], pair_ids, bootstrap, seed) -> dict:
    """Per estimator: bias_summary (bootstrap over ring pairs) plus kind, counts, failures and speed."""
    out = {}
    for i, (name, r) in enumerate(res.items()):
        s = bias_summary(g_true, r.g, r.failed, pair_ids, bootstrap=bootstrap, rng=[seed, i])
        s.update(kind=r.kind, n_total=int(len(r.g)), n_failed=int(r.failed.sum()) if r.error is None else int(len(r.g)),
                 seconds=r.seconds, stamps_per_s=len(r.g) / max(r.seconds, 1e-9), error=r.error)
        out[name] = s
    return out


def config_mismatch(est, data_cfg: dict) -> list[str]:
    """Differences between an estimator's training data config (metadata) and the test data."""
    trained = ((est.metadata or {}).get("config") or {}).get("data")
    if not isinstance(trained, dict):
        return []
    out = []
    for key in ("noise_scale", "noise_kernel", "psf_fwhm", "pixel_scale", "stamp_size"):
        a, b = trained.get(key), data_cfg.get(key)
        if a != b:
            out.append(f"data.{key}: trained {a!r}, test {b!r}")
    ta = (trained.get("source") or {}).get("_target_")
    tb = (data_cfg.get("source") or {}).get("_target_")
    if ta != tb:
        out.append(f"data.source: trained {ta}, test {tb}")
    return out


def noise_level_checkpoints(noise_cfg) -> dict[float, Path]:
    """``studies.noise``'s per-level estimator files: ``checkpoints`` ({level: file}) and, with
    ``sweep_dir`` (a ``train.py -m`` multirun directory, e.g. of ``experiment=paper_clash
    data/noise=full,half,quarter``), every job's ``estimator_refit.pt`` keyed by the
    ``data.noise_scale`` of its ``config_resolved.yaml`` (explicit ``checkpoints`` win). Raises
    ``FileNotFoundError`` for a missing file or sweep directory and ``ValueError`` when two jobs of
    the sweep share a level."""
    import yaml

    noise_cfg = noise_cfg or {}
    out: dict[float, Path] = {}
    sweep = noise_cfg.get("sweep_dir")
    if sweep:
        root = Path(str(sweep)).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"studies.noise.sweep_dir: {root} is not a directory (absolute: {root.resolve()})")
        found: dict[float, Path] = {}
        for est in sorted(root.glob("*/estimator_refit.pt")):
            cfg_file = est.parent / "config_resolved.yaml"
            level = ((yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None) or {}).get("data", {}).get(
                "noise_scale")
            if level is None:
                log.warning("studies.noise.sweep_dir: %s has no data.noise_scale in config_resolved.yaml; skipped", est)
                continue
            if float(level) in found:
                raise ValueError(f"studies.noise.sweep_dir: {found[float(level)]} and {est} were both trained at "
                                 f"noise_scale {level}; name the one to use in studies.noise.checkpoints")
            found[float(level)] = est
        if not found:
            raise FileNotFoundError(f"studies.noise.sweep_dir: no job with estimator_refit.pt under {root}")
        out.update(found)
    out.update({float(k): Path(str(v)).expanduser() for k, v in dict(noise_cfg.get("checkpoints") or {}).items() if v})
    for lvl, p in out.items():
        if not p.is_file():
            raise FileNotFoundError(f"studies.noise.checkpoints[{lvl}]: no estimator file at {p} (absolute: {p.resolve()})")
    return out

