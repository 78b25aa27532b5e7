"""Evaluation task: CNN estimators and classical baselines on the same test stamps.

For every estimator (each CNN file with and without the 8-fold symmetry average, and the
baselines moments, ksb, regauss, fpfs, wlenet) and each shear component this measures

- m and c of g_est = (1 + m) g_true + c (``docs/CONVENTIONS.md``) with errors. With ring pairs
  (``test.ring``: every galaxy also drawn rotated by 90 degrees with the same shear) m and c come
  from the pair-averaged fit, which cancels intrinsic shape noise;
- sigma, the RMS error of the calibrated estimate (g_est - c) / (1 + m) per galaxy (unpaired
  fit), with errors from a bootstrap over ring pairs (pairs are resampled whole, since the two
  copies of a galaxy are correlated);
- the number of failures (estimator flags, non-finite outputs), shown in every table.

Studies (``studies.*.enabled``), each written as a CSV and a PNG:

- ``magnitude_bins``: m and sigma in bins of the stamp magnitude (per-bin calibration, and sigma
  with the global calibration as ``sigma{k}_fixed``);
- ``conditional``: m, c (with errors, ring-pair fit) and sigma of every estimator in quantile bins
  of the *measured* magnitude, half-light radius and S/N (``measure_observables`` on the test
  stamps; ring pairs binned by their mean observable), ``conditional_bins.csv`` / ``.png``;
- ``shear_bins``: per component, the response m, the mean calibrated residual and sigma in bins
  of the true shear, all with the global calibration (a local slope in a bin 0.025 wide would be
  hopelessly noisy; m_bin = m + <residual> / <g_true> instead);
- ``centroid_shift``: sigma and m vs a centroid misalignment of ``s`` half-light radii in a random
  direction (same galaxies, shears, directions and noise at every ``s``);
- ``background_offset``: sigma and m vs a constant added to every pixel (units of the noise sigma);
- ``noise_levels``: sigma and m at noise_scale K, K/2, K/4 (same galaxies and shears at every
  level), with a model per level when ``studies.noise.checkpoints`` gives one, else the main
  CNN(s) at every level (recorded in the notes).
- ``metacal``: metacal-calibrated rows (``<R>^-1 g``) for every CNN and the moments baseline on the
  test set, and per-magnitude-bin m, c on real COSMOS galaxies (validation only) in the +-g
  common-noise design (``wlshear.tasks.metacal_study``), ``metacal_test.csv``, ``metacal_real.csv/png``.

In the studies ``sigma`` is recalibrated on the study set itself; ``sigma_fixed`` keeps the
calibration measured on the main test set (what a survey applying a fixed calibration would see).

Run-directory outputs: ``results.json``, ``summary.md`` (Table-4-like Markdown), ``table.csv``,
one CSV + PNG per study, ``scatter_<estimator>.png``, ``config_resolved.yaml``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from wlshear.metrics.bias import (  # noqa: F401 - bias_summary, pair_bootstrap_sigma re-exported
    average_pairs, bias_summary, pair_bootstrap_sigma, valid_rows,
)
from wlshear.metrics.binned import bin_edges, binned_bias, to_csv
from wlshear.metrics.plots import plot_shear_bins, plot_study
from wlshear.utils.hydra import print_config_tree, save_resolved_config, write_json
from wlshear.tasks.rules import RELATIONS, EVALUATE_RULES
from wlshear.utils.validate import validate_config

log = logging.getLogger(__name__)

__all__ = [
    "run",
    "resolve_checkpoints",
    "load_cnns",
    "build_baselines",
    "run_estimators",
    "bias_summary",
    "pair_bootstrap_sigma",
    "summary_table",
    "EstimateResult",
]

TABLE_KEYS = ("m1", "m2", "c1", "c2", "sigma1", "sigma2")
# baselines whose output depends on the whole batch (FPFS 'ensemble' response): never chunked
_UNCHUNKED = {"fpfs"}


# ---------------------------------------------------------------------------------------------
# estimators


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
    from wlshear.models.estimator import load_estimator

    out = {}
    for name, path in paths.items():
        est = load_estimator(path, weights_only=weights_only)
        log.info("loaded %s from %s (%s; calibration %s)", name, path, type(est.net).__name__,
                 {k: round(v, 5) for k, v in est.calibration.items()})
        out[name] = est
    return out


def build_baselines(names, kwargs=None, wlenet_dir=None, noise_sigma=None, wlenet_level="1.000"):
    """Instantiate baselines; returns ``(name -> estimator, name -> skip reason)``.

    A baseline whose dependency (anacal) or files (wlenet release) are missing is skipped with the
    reason recorded. ``noise_sigma`` (counts) is passed to FPFS unless its kwargs set it.
    """
    from wlshear.baselines import get_baseline

    kwargs = {str(k): dict(v or {}) for k, v in dict(kwargs or {}).items()}
    built, skipped = {}, {}
    for name in names or []:
        name = str(name).lower()
        kw = dict(kwargs.get(name, {}))
        if name == "fpfs" and noise_sigma is not None:
            kw.setdefault("noise_sigma", float(noise_sigma))
        if name == "wlenet":
            d = Path(str(wlenet_dir)) if wlenet_dir else None
            if d is None or not d.exists():
                skipped[name] = f"released wlenet model not found at {d} (baselines.wlenet_dir)"
                log.warning("skipping wlenet: %s", skipped[name])
                continue
            kw.setdefault("path_or_dir", str(d))
            kw.setdefault("noise_level", wlenet_level)
        try:
            built[name] = get_baseline(name, **kw)
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
    from tqdm.auto import tqdm

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
                if key in _UNCHUNKED or n <= chunk:
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


# ---------------------------------------------------------------------------------------------
# statistics


def _fixed_sigma(g_true, g_est, failed, cal) -> dict:
    """RMS of (g_est - c) / (1 + m) - g_true with a given calibration ``cal`` (m1, c1, m2, c2)."""
    out = {}
    ok = valid_rows(g_true, g_est, failed)
    n = int(ok.sum())
    for k in (1, 2):
        if cal is None or n == 0 or not np.isfinite(cal.get(f"m{k}", np.nan)):
            out[f"sigma{k}_fixed"] = out[f"sigma{k}_fixed_err"] = float("nan")
            continue
        r = (g_est[ok, k - 1] - cal[f"c{k}"]) / (1 + cal[f"m{k}"]) - g_true[ok, k - 1]
        s = float(np.sqrt(np.mean(r**2)))
        out[f"sigma{k}_fixed"] = s
        out[f"sigma{k}_fixed_err"] = s / math.sqrt(2 * max(n - 1, 1))
    return out


def _calibration(summary: dict) -> dict:
    return {k: summary[k] for k in ("m1", "c1", "m2", "c2")}


def shear_bin_rows(g_true, g_est, failed, pair_ids, cal, edges, name) -> list[dict]:
    """Per component and true-shear bin: response m, mean calibrated residual and sigma, with the
    global calibration ``cal``; m and the residual from pair means when ``pair_ids`` has pairs."""
    g_true = np.asarray(g_true, dtype=np.float64)
    g_est = np.asarray(g_est, dtype=np.float64)
    ok = valid_rows(g_true, g_est, failed)
    paired = pair_ids is not None and len(np.unique(pair_ids)) < len(pair_ids)
    if paired:
        pt, pe, pbad = average_pairs(g_true, g_est, pair_ids, failed)
    else:
        pt, pe, pbad = g_true, g_est, ~ok
    rows = []
    for k in range(2):
        m0, c0 = cal[f"m{k + 1}"], cal[f"c{k + 1}"]
        x_all, x_p = g_true[:, k], pt[:, k]
        for b in range(len(edges) - 1):
            lo, hi = edges[b], edges[b + 1]
            last = b == len(edges) - 2
            sel = (x_all >= lo) & ((x_all <= hi) if last else (x_all < hi))
            selp = (x_p >= lo) & ((x_p <= hi) if last else (x_p < hi))
            use, usep = sel & ok, selp & ~pbad
            row = {"estimator": name, "component": k + 1, "g_lo": float(lo), "g_hi": float(hi),
                   "g_mean": float(np.mean(x_all[sel])) if sel.any() else float("nan"),
                   "n": int(use.sum()), "n_failed": int((sel & ~ok).sum())}
            r = pe[usep, k] - c0 - (1 + m0) * pt[usep, k]
            npair = r.size
            gm = float(np.mean(pt[usep, k])) if npair else float("nan")
            if npair >= 2:
                rm, re = float(np.mean(r)), float(np.std(r, ddof=1) / math.sqrt(npair))
                row["m"] = m0 + rm / gm if gm != 0 else float("nan")
                row["m_err"] = re / abs(gm) if gm != 0 else float("nan")
                row["delta"] = rm / (1 + m0)
                row["delta_err"] = re / abs(1 + m0)
            else:
                row.update(m=float("nan"), m_err=float("nan"), delta=float("nan"), delta_err=float("nan"))
            res = (g_est[use, k] - c0) / (1 + m0) - g_true[use, k]
            if res.size >= 2:
                s = float(np.sqrt(np.mean(res**2)))
                row["sigma"], row["sigma_err"] = s, s / math.sqrt(2 * (res.size - 1))
            else:
                row["sigma"] = row["sigma_err"] = float("nan")
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# tables and plots


def _pm(v, e, fmt) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    s = format(v, fmt)
    if e is not None and np.isfinite(e):
        s += " ± " + format(e, fmt.lstrip("+"))
    return s


def summary_table(results: dict, skipped: dict | None = None) -> str:
    """Markdown table like the paper's Table 4: m, c (ring-pair fit), sigma (per galaxy), failures."""
    lines = ["| estimator | m1 | m2 | c1 | c2 | sigma1 | sigma2 | failures |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r.get("error"):
            lines.append(f"| {name} | crashed: {r['error']} |  |  |  |  |  | {r['n_failed']}/{r['n_total']} |")
            continue
        frac = r["n_failed"] / max(r["n_total"], 1)
        cells = [_pm(r["m1"], r["m1_err"], "+.4f"), _pm(r["m2"], r["m2_err"], "+.4f"),
                 _pm(r["c1"], r["c1_err"], "+.5f"), _pm(r["c2"], r["c2_err"], "+.5f"),
                 _pm(r["sigma1"], r["sigma1_err"], ".4f"), _pm(r["sigma2"], r["sigma2_err"], ".4f"),
                 f"{r['n_failed']}/{r['n_total']} ({100 * frac:.2f}%)"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, reason in (skipped or {}).items():
        lines.append(f"| {name} | skipped: {reason} |  |  |  |  |  |  |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# study sets


def _shifted_set(renderer, n: int, seed: int, shift_hlr: float, ring: bool, cache_dir, progress: bool,
                 max_failure_fraction: float = 0.01):
    """Test stamps whose centroid is shifted by ``shift_hlr`` x hlr_px in a random direction.

    Galaxies, shears, directions and noise are the same for every ``shift_hlr`` (same seed); ring
    pairs share the shift. Cached in ``cache_dir`` like ``CachedStampSet``.
    """
    from tqdm.auto import tqdm

    from wlshear.data.datasets import load_cached, renderer_description, save_cached
    from wlshear.sim.render import StampBatch

    desc = {"renderer": renderer_description(renderer), "n": n, "seed": seed, "ring": ring,
            "shift_hlr": float(shift_hlr), "kind": "centroid"}
    key = hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser() / f"centroid_{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        cached = load_cached(path, f"centroid {shift_hlr:g} hlr", n, max_failure_fraction)
        if cached is not None:
            return cached
    p_seq, n_seq, d_seq = np.random.SeedSequence([seed, 104729]).spawn(3)
    params = renderer.sample_params(np.random.default_rng(p_seq), n, ring=ring)
    phi_pair = np.random.default_rng(d_seq).uniform(0, 2 * np.pi, int(params.pair_id.max()) + 1)
    phi = phi_pair[params.pair_id]
    hlr = renderer.source.catalog["hlr_px"][params.galaxy_id.astype(np.int64)] * np.sqrt(params.mu)
    params.dx = shift_hlr * hlr * np.cos(phi)
    params.dy = shift_hlr * hlr * np.sin(phi)
    nrng = np.random.default_rng(n_seq)
    parts = []
    for s in tqdm(range(0, n, 256), desc=f"rendering shift {shift_hlr:g} hlr", disable=not progress, leave=False):
        parts.append(renderer.render(params.subset(slice(s, s + 256)), nrng))
    batch = StampBatch(np.concatenate([b.stamps for b in parts]),
                       {k: np.concatenate([b.meta[k] for b in parts]) for k in parts[0].meta},
                       [f for b in parts for f in b.failures])
    save_cached(path, batch, desc, f"centroid {shift_hlr:g} hlr", n, max_failure_fraction)
    return batch


def _noise_renderer(renderer, kernel, scale: float):
    from wlshear.sim.noise import CorrelatedNoise

    r = copy.copy(renderer)
    r.noise = CorrelatedNoise(kernel, scale) if scale > 0 else None
    return r


def _config_mismatch(est, data_cfg: dict) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# the task


def _summaries(g_true, res: dict[str, EstimateResult], pair_ids, bootstrap, seed) -> dict:
    out = {}
    for i, (name, r) in enumerate(res.items()):
        s = bias_summary(g_true, r.g, r.failed, pair_ids, bootstrap=bootstrap, rng=[seed, i])
        s.update(kind=r.kind, n_total=int(len(r.g)), n_failed=int(r.failed.sum()) if r.error is None else int(len(r.g)),
                 seconds=r.seconds, stamps_per_s=len(r.g) / max(r.seconds, 1e-9), error=r.error)
        out[name] = s
    return out


def _study_rows(g_true, res, pair_ids, cal_of, extra: dict) -> list[dict]:
    rows = []
    for name, r in res.items():
        s = bias_summary(g_true, r.g, r.failed, pair_ids, bootstrap=0)
        row = dict(extra)
        row["estimator"] = name
        row.update({k: s[k] for k in ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err",
                                       "sigma1", "sigma1_err", "sigma2", "sigma2_err")})
        row.update(_fixed_sigma(g_true, r.g, r.failed, cal_of(name)))
        row["n"] = int(len(r.g))
        row["n_failed"] = int(r.failed.sum())
        rows.append(row)
    return rows


def run(cfg: DictConfig) -> dict:
    """Evaluate; returns the results dict (also written to ``results.json``)."""
    from hydra.utils import instantiate

    from wlshear.data.datasets import CachedStampSet

    t_start = time.time()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # check the inputs before any (slow) rendering
    validate_config(cfg, EVALUATE_RULES, "evaluate config", RELATIONS)
    ckpt_paths = resolve_checkpoints(cfg.get("checkpoints"), cfg.get("run_dir"))
    st = cfg.get("studies") or {}
    noise_ckpts = {float(k): Path(str(v)).expanduser()
                   for k, v in dict((st.get("noise") or {}).get("checkpoints") or {}).items() if v}
    for lvl, p in noise_ckpts.items():
        if not p.is_file():
            raise FileNotFoundError(f"studies.noise.checkpoints[{lvl}]: no estimator file at {p} "
                                    f"(absolute: {p.resolve()})")
    if not ckpt_paths:
        log.warning("no CNN checkpoints given (run_dir / checkpoints): evaluating baselines only")
    save_resolved_config(cfg, out_dir)
    if (cfg.get("extras") or {}).get("print_config", False):
        print_config_tree(cfg, order=("data", "checkpoints", "test", "baselines", "studies", "paths"),
                          save_to=out_dir / "config_tree.txt")

    progress = True
    seed = int(cfg.seed)
    bootstrap = int(cfg.get("bootstrap", 0) or 0)
    symmetrize = [bool(s) for s in cfg.get("symmetrize", [False, True])]
    batch_size = int(cfg.get("batch_size", 256))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    notes: list[str] = []

    weights_only = not bool(cfg.get("trust_checkpoints", False))
    cnns = load_cnns(ckpt_paths, weights_only=weights_only)
    mismatch = {name: _config_mismatch(est, data_cfg) for name, est in cnns.items()}
    for name, diffs in mismatch.items():
        for d in diffs:
            msg = f"{name} was trained on different data than this test set: {d}"
            log.warning(msg)
            notes.append(msg)

    log.info("building data <%s>", cfg.data._target_)
    dm = instantiate(cfg.data)
    renderer = dm.eval_renderer
    noise_sigma = dm.noise.sigma if dm.noise is not None else None
    bl_cfg = cfg.get("baselines") or {}
    bl_names = list(bl_cfg.get("names") or [])
    bl_kwargs = bl_cfg.get("kwargs") or {}
    if isinstance(bl_kwargs, DictConfig):
        bl_kwargs = OmegaConf.to_container(bl_kwargs, resolve=True)
    wlenet_dir = bl_cfg.get("wlenet_dir")
    baselines, skipped = build_baselines(bl_names, bl_kwargs, wlenet_dir, noise_sigma=noise_sigma)

    # -- main test set ---------------------------------------------------------------------
    tcfg = cfg.test
    test_seed = seed * 1000 + int(tcfg.get("seed_offset", 5))
    max_fail = float(dm.hparams.max_failure_fraction)
    test = CachedStampSet(renderer, int(tcfg.n), test_seed, cache_dir=dm.cache_dir, ring=bool(tcfg.ring),
                          name=str(tcfg.get("name", "evaltest")), progress=progress, max_failure_fraction=max_fail)
    stamps = test.batch.stamps
    g_true = test.batch.shear.astype(np.float64)
    pair_ids = test.meta.get("pair_id") if tcfg.ring else None
    log.info("test set: %d stamps (%d failed to render), ring=%s, cache %s", len(test),
             len(test.batch.failures), bool(tcfg.ring), test.path)
    res = run_estimators(stamps, cnns, baselines, symmetrize, batch_size, progress=progress, desc="(test set)")
    summ = _summaries(g_true, res, pair_ids, bootstrap, seed)
    for name, s in summ.items():
        for k in (1, 2):
            e = s[f"m{k}_err"]
            target = float(cfg.get("target_sigma_m", 2e-3))
            if np.isfinite(e) and e > target and s["kind"] == "cnn":
                need = int(math.ceil(len(test) * (e / target) ** 2))
                msg = (f"{name}: sigma_m{k} = {e:.4f} > target {target:g}; about test.n={need} stamps "
                       f"(ring={bool(tcfg.ring)}) would reach it")
                log.warning(msg)
                notes.append(msg)
        log.info("%-16s m1=%+.4f±%.4f m2=%+.4f±%.4f c1=%+.5f c2=%+.5f sigma1=%.4f±%.4f sigma2=%.4f±%.4f failed=%d/%d",
                 name, s["m1"], s["m1_err"], s["m2"], s["m2_err"], s["c1"], s["c2"], s["sigma1"],
                 s["sigma1_err"], s["sigma2"], s["sigma2_err"], s["n_failed"], s["n_total"])
    for name, s in summ.items():
        if name.rsplit("_sym", 1)[0] in cnns:
            s["checkpoint"] = str(ckpt_paths[name.rsplit("_sym", 1)[0]])
            s["symmetrized"] = name.endswith("_sym")
            s["file_calibration"] = cnns[name.rsplit("_sym", 1)[0]].calibration
    cal_of = lambda name: _calibration(summ[name]) if name in summ else None  # noqa: E731

    files = {"summary": "summary.md", "results": "results.json", "table": "table.csv"}
    to_csv([{"estimator": k, **{kk: v for kk, v in s.items() if not isinstance(v, dict)}} for k, s in summ.items()],
           out_dir / "table.csv")
    if (cfg.get("plots") or {}).get("scatter", True):
        from wlshear.metrics.plots import plot_shear_scatter

        for name, r in res.items():
            if r.error is None and (~r.failed).sum() >= 3:
                fn = f"scatter_{name}.png"
                plot_shear_scatter(g_true, r.g, out_dir / fn, failed=r.failed,
                                   title=f"{name}: {len(r.g)} test stamps, {int(r.failed.sum())} failed")
                files[f"scatter_{name}"] = fn

    # -- studies ---------------------------------------------------------------------------
    study_sym = [bool(s) for s in st.get("cnn_symmetrize", [True])]
    study_bl = [b for b in (st.get("baselines") or []) if b in baselines]
    sres = {n: r for n, r in res.items()
            if (r.kind == "cnn" and any(n == row for row, _, sym in cnn_rows(cnns, study_sym)))
            or (r.kind == "baseline" and n in study_bl)}
    study_baselines = {n: baselines[n] for n in study_bl}
    studies: dict = {}

    mcfg = st.get("magnitude") or {}
    if mcfg.get("enabled", False):
        key = str(mcfg.get("key", "mag"))
        if key not in test.meta:
            raise ValueError(f"studies.magnitude.key={key!r} is not a stamp meta column; use one of {sorted(test.meta)}")
        bins = mcfg.get("bins", 5)
        bins = list(bins) if not isinstance(bins, (int, float)) else int(bins)
        x = np.asarray(test.meta[key], dtype=np.float64)
        edges = bin_edges(x, bins)
        rows = []
        for name, r in sres.items():
            brs = binned_bias(x, g_true, r.g, bins=edges, failed=r.failed, quantity=key, extra={"estimator": name})
            for b, br in enumerate(brs):
                last = b == len(edges) - 2
                sel = (x >= edges[b]) & ((x <= edges[b + 1]) if last else (x < edges[b + 1]))
                br.update(_fixed_sigma(g_true[sel], r.g[sel], r.failed[sel], cal_of(name)))
            rows += brs
        to_csv(rows, out_dir / "magnitude_bins.csv")
        plot_study(rows, f"{key}_mean", out_dir / "magnitude_bins.png", xlabel=f"{key} (bin mean)",
                    stats=("sigma", "sigma_fixed", "m"))
        studies["magnitude_bins"] = {"csv": "magnitude_bins.csv", "png": "magnitude_bins.png",
                                     "edges": edges.tolist(), "key": key, "rows": rows}
        files["magnitude_bins"] = "magnitude_bins.csv"

    cdcfg = st.get("conditional") or {}
    if cdcfg.get("enabled", False):
        from wlshear.observables import measure_observables
        from wlshear.metrics.conditional import conditional_rows
        from wlshear.metrics.plots import plot_conditional

        obs = measure_observables(stamps)
        cbins = cdcfg.get("bins") or {"mag": 5, "hlr_px": 3, "snr": 3}
        cbins = OmegaConf.to_container(cbins, resolve=True) if isinstance(cbins, DictConfig) else dict(cbins)
        cest = res if cdcfg.get("all_estimators", True) else sres
        rows = conditional_rows(g_true, {n: (r.g, r.failed) for n, r in cest.items()}, obs, pair_ids, cbins,
                                {n: cal_of(n) for n in cest})
        to_csv(rows, out_dir / "conditional_bins.csv")
        plot_conditional(rows, out_dir / "conditional_bins.png")
        studies["conditional_bins"] = {"csv": "conditional_bins.csv", "png": "conditional_bins.png",
                                       "bins": cbins, "observables": "measure_observables on the test stamps"
                                       + (" (pair means)" if pair_ids is not None else ""), "rows": rows}

    scfg = st.get("shear") or {}
    if scfg.get("enabled", False):
        lo, hi = (float(v) for v in scfg.get("range", [-0.2, 0.2]))
        edges = np.linspace(lo, hi, int(scfg.get("bins", 16)) + 1)
        rows = []
        for name, r in sres.items():
            rows += shear_bin_rows(g_true, r.g, r.failed, pair_ids, cal_of(name), edges, name)
        to_csv(rows, out_dir / "shear_bins.csv")
        plot_shear_bins(rows, out_dir / "shear_bins.png")
        studies["shear_bins"] = {"csv": "shear_bins.csv", "png": "shear_bins.png", "edges": edges.tolist(), "rows": rows}

    ccfg = st.get("centroid") or {}
    if ccfg.get("enabled", False):
        rows = []
        n_c = int(ccfg.get("n", 4000))
        for shift in [float(s) for s in ccfg.get("shifts_hlr", [0, 0.2, 0.4, 0.6, 0.8])]:
            b = _shifted_set(renderer, n_c, test_seed + 17, shift, bool(tcfg.ring), dm.cache_dir, progress,
                             max_failure_fraction=max_fail)
            log.info("centroid shift %.2f hlr: %d stamps (%d failed to render)", shift, len(b), len(b.failures))
            r_s = run_estimators(b.stamps, cnns, study_baselines, study_sym, batch_size, progress=progress,
                                 desc=f"(shift {shift:g} hlr)")
            rows += _study_rows(b.shear.astype(np.float64), r_s, b.meta["pair_id"] if tcfg.ring else None, cal_of,
                                {"shift_hlr": shift, "n_render_failed": len(b.failures)})
        to_csv(rows, out_dir / "centroid_shift.csv")
        plot_study(rows, "shift_hlr", out_dir / "centroid_shift.png", "centroid shift [half-light radii]")
        studies["centroid_shift"] = {"csv": "centroid_shift.csv", "png": "centroid_shift.png", "rows": rows}

    bcfg = st.get("background") or {}
    if bcfg.get("enabled", False):
        if noise_sigma is None:
            from wlshear.sim.noise import CorrelatedNoise

            unit = CorrelatedNoise(dm.hparams.noise_kernel, 1.0).sigma
            notes.append(f"background offsets: the test set is noiseless; offsets are in units of the "
                         f"full-level kernel's sigma {unit:.3g} counts")
        else:
            unit = noise_sigma
        nb = bcfg.get("n")
        nb = len(test) if nb is None else min(int(nb), len(test))
        rows = []
        for off in [float(o) for o in bcfg.get("offsets_sigma", [0, 0.5, 1, 2])]:
            r_b = run_estimators(stamps[:nb] + np.float32(off * unit), cnns, study_baselines, study_sym, batch_size,
                                 progress=progress, desc=f"(offset {off:g} sigma)")
            rows += _study_rows(g_true[:nb], r_b, pair_ids[:nb] if pair_ids is not None else None, cal_of,
                                {"offset_sigma": off, "offset_counts": off * unit})
        to_csv(rows, out_dir / "background_offset.csv")
        plot_study(rows, "offset_sigma", out_dir / "background_offset.png", "constant background [noise sigma]")
        studies["background_offset"] = {"csv": "background_offset.csv", "png": "background_offset.png",
                                        "noise_sigma_counts": unit, "rows": rows}

    ncfg = st.get("noise") or {}
    if ncfg.get("enabled", False):
        rows = []
        n_n = int(ncfg.get("n", 4000))
        levels = [float(v) for v in ncfg.get("levels", [1.0, 0.5, 0.25])]
        if not noise_ckpts:
            msg = (f"noise study: no per-level models (studies.noise.checkpoints); the same CNN(s) "
                   f"{list(cnns)} are evaluated at every noise level (trained at data.noise_scale="
                   f"{data_cfg.get('noise_scale')} unless their metadata says otherwise)")
            log.info(msg)
            notes.append(msg)
        other_bl = {n: b for n, b in study_baselines.items() if n not in ("wlenet", "fpfs")}
        for lvl in levels:
            rr = _noise_renderer(renderer, dm.hparams.noise_kernel, lvl)
            ns = CachedStampSet(rr, n_n, test_seed + 31, cache_dir=dm.cache_dir, ring=bool(tcfg.ring),
                                name=f"evalnoise{lvl:g}", progress=progress, max_failure_fraction=max_fail)
            bls = dict(other_bl)
            lvl_bl, lvl_skip = build_baselines([b for b in study_bl if b in ("wlenet", "fpfs")], bl_kwargs, wlenet_dir,
                                               noise_sigma=rr.noise.sigma if rr.noise is not None else 1e-6,
                                               wlenet_level=f"{lvl:.3f}" if f"{lvl:.3f}" in ("1.000", "0.500", "0.250") else "1.000")
            bls.update(lvl_bl)
            for bname, reason in lvl_skip.items():
                notes.append(f"noise level {lvl:g}: {bname} skipped: {reason}")
            models = dict(cnns)
            if lvl in noise_ckpts:
                from wlshear.models.estimator import load_estimator

                models = {**models, "cnn_matched": load_estimator(noise_ckpts[lvl], weights_only=weights_only)}
            r_n = run_estimators(ns.batch.stamps, models, bls, study_sym, batch_size, progress=progress,
                                 desc=f"(noise {lvl:g} K)")
            lrows = _study_rows(ns.batch.shear.astype(np.float64), r_n,
                                ns.meta["pair_id"] if tcfg.ring else None,
                                lambda name: cal_of(name) if not name.startswith("cnn_matched") else None,
                                {"noise_scale": lvl, "noise_sigma_counts": rr.noise.sigma if rr.noise else 0.0})
            for row in lrows:  # which file made each CNN row at this level
                base = row["estimator"].rsplit("_sym", 1)[0]
                row["checkpoint"] = (str(noise_ckpts[lvl]) if base == "cnn_matched"
                                     else str(ckpt_paths[base]) if base in ckpt_paths else "")
            rows += lrows
        to_csv(rows, out_dir / "noise_levels.csv")
        plot_study(rows, "noise_scale", out_dir / "noise_levels.png", "noise level [x K_bg]")
        studies["noise_levels"] = {"csv": "noise_levels.csv", "png": "noise_levels.png", "rows": rows,
                                   "per_level_models": {str(k): str(v) for k, v in noise_ckpts.items()}}

    mccfg = st.get("metacal") or {}
    if mccfg.get("enabled", False):
        from wlshear.tasks.metacal_study import metacal_study

        mccfg = OmegaConf.to_container(mccfg, resolve=True) if isinstance(mccfg, DictConfig) else dict(mccfg)
        n_mc = mccfg.get("n")
        sel = np.ones(len(test), bool) if n_mc is None else (
            pair_ids < int(n_mc) // 2 if pair_ids is not None else np.arange(len(test)) < int(n_mc))
        study, mc_notes = metacal_study(mccfg, stamps=stamps[sel], g_true=g_true[sel],
                                        pair_ids=pair_ids[sel] if pair_ids is not None else None, cnns=cnns,
                                        baselines=baselines, renderer=renderer, data_cfg=data_cfg, out_dir=out_dir,
                                        seed=seed)
        studies["metacal"] = study
        notes += mc_notes

    # -- write -----------------------------------------------------------------------------
    results = {
        "run_dir": str(out_dir),
        "checkpoints": {k: str(v) for k, v in ckpt_paths.items()},
        "test_set": {"n": len(test), "n_requested": int(tcfg.n), "n_render_failed": len(test.batch.failures),
                     "ring": bool(tcfg.ring), "seed": test_seed, "cache": str(test.path) if test.path else None,
                     "noise_scale": data_cfg.get("noise_scale"), "noise_sigma_counts": noise_sigma,
                     "population": data_cfg.get("eval_population"),
                     "source": (data_cfg.get("source") or {}).get("_target_")},
        "estimators": summ,
        "skipped": skipped,
        "training_data_mismatch": mismatch,
        "studies": studies,
        "notes": notes,
        "files": files,
        "wall_time_s": time.time() - t_start,
    }
    for sname, s in studies.items():
        files[sname] = s["csv"]
        if s.get("png"):
            files[f"{sname}_plot"] = s["png"]
    write_json(results, out_dir / "results.json")
    (out_dir / "summary.md").write_text(_summary_markdown(results))
    log.info("wrote %s and %s", out_dir / "results.json", out_dir / "summary.md")
    print(summary_table(summ, skipped))
    return results


def _summary_markdown(results: dict) -> str:
    ts = results["test_set"]
    lines = [
        "# wlshear evaluation",
        "",
        f"Test set: {ts['n']} stamps ({ts['n_render_failed']} failed to render), source {ts['source']}, "
        f"population {ts['population']}, noise_scale {ts['noise_scale']}, "
        f"{'90-degree ring pairs' if ts['ring'] else 'no ring pairs'}, seed {ts['seed']}.",
        "",
        "m, c: fit of g_est = (1 + m) g + c" + (" on ring-pair means (shape noise cancelled)" if ts["ring"] else "")
        + "; sigma: RMS error per galaxy of the calibrated estimate (g_est - c) / (1 + m); errors: "
        + ("bootstrap over ring pairs" if results["estimators"] and next(iter(results["estimators"].values())).get("bootstrap") else "analytic")
        + ". Failures are counted in the last column and excluded from the fits. "
        "CNN rows `<name>_sym` use the 8-fold symmetry average.",
        "",
        summary_table(results["estimators"], results["skipped"]),
        "Published (Springer et al. 2018, CLASH-matched COSMOS test set): moments m 0.119/0.121, sigma "
        "0.257/0.259; CNN m 0.005/0.005, sigma 0.225/0.224.",
        "",
    ]
    if results["checkpoints"]:
        lines += ["## Estimator files", ""] + [f"- `{k}`: `{v}`" for k, v in results["checkpoints"].items()] + [""]
    if results["studies"]:
        lines += ["## Studies", ""]
        for name, s in results["studies"].items():
            lines.append(f"- {name}: [{s['csv']}]({s['csv']}), ![{name}]({s['png']})")
        lines.append("")
    if results["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines.append(f"Wall time {results['wall_time_s']:.0f} s.")
    return "\n".join(lines) + "\n"
