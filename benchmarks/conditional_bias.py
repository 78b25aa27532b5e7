"""Conditional shear bias (issue #8): unconditional calibration vs calibration surface vs a
training objective that targets each galaxy's response, per bin of measured magnitude and size.

Estimators compared on the same ring-pair stamps (bins of the pair-mean observable measured on the
stamps with ``measure_observables``; m, c from the pair-averaged fit; sigma = RMS of the delivered
estimate minus the truth per galaxy, i.e. with the estimator's own whole-population calibration):

- ``uncond``: the newest trained CNN (``outputs/train/runs/*/estimator_refit.pt``), symmetrised, with
  one global (m, c) per component re-fitted on the calibration set;
- ``surface``: ``uncond`` plus a calibration surface m(mag, log10 hlr), c(mag, log10 hlr) (poly,
  degree 3, two stages; settings chosen on a held-out half of the calibration set) fitted on the
  calibration set (``wlshear.calibration``) and carried by the estimator file;
- ``objective``: the same network fine-tuned for ``--finetune-epochs`` passes over a fixed set of
  grouped stamps (K shears of one galaxy, shared noise; ``GroupedShearStream``) with
  ``ConditionalBiasLoss`` (MSE + slope_weight * mean (slope - 1)^2), then one global (m, c) from the
  calibration set;
- ``mse_control``: the same fine-tuning with plain MSE (same stamps, steps and seed), to separate
  the objective's effect from "more training";
- on the real galaxies also the authors' released model (``wlenet``) and ``ksb``.

Sets (cached in data_cache/, see benchmarks/condbias_sets.py): calibration 48k and test 40k
parametric stamps (different seeds), 4k stamps of the 50 real COSMOS galaxies with F814W < 25 in
shared/data/cosmos_real_100 (never trained on), all at full CLASH noise, test mode (rotation+mirror).

    python benchmarks/conditional_bias.py [--estimator PATH] [--n-cal 48000] [--n-test 40000]
        [--n-groups 3000] [--finetune-epochs 6]

Writes benchmarks/RESULTS_condbias.md and .json and outputs/condbias/ (estimator files, plots).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from condbias_sets import CACHE, cached, parametric_renderer, real_renderer  # noqa: E402

BINS = {"mag": 5, "hlr_px": 3, "snr": 3}


def newest_estimator() -> Path | None:
    c = sorted((REPO / "outputs" / "train" / "runs").glob("*/estimator_refit.pt"), key=lambda p: p.stat().st_mtime)
    return c[-1] if c else None


def global_cal(g_true, g, pair_ids) -> dict:
    from wlshear.metrics.bias import fit_bias

    f = fit_bias(g_true, g, pair_ids=pair_ids)
    return {"m1": float(f.m[0]), "c1": float(f.c[0]), "m2": float(f.m[1]), "c2": float(f.c[1])}


def compose_cal(cal_old: dict, cal_new: dict) -> dict:
    """Calibration equivalent to applying cal_old then cal_new: g_raw = (1+m_o)((1+m_n) g + c_n) + c_o."""
    out = {}
    for k in (1, 2):
        mo, co, mn, cn = cal_old[f"m{k}"], cal_old[f"c{k}"], cal_new[f"m{k}"], cal_new[f"c{k}"]
        out[f"m{k}"] = (1 + mo) * (1 + mn) - 1
        out[f"c{k}"] = (1 + mo) * cn + co
    return out


def grouped_set(n_groups: int, k: int, seed: int, workers: int = 2):
    """A fixed set of groups (K shears of one galaxy, shared noise) from the training renderer
    (homogenised population, full training augmentation), cached as npz."""
    import torch
    from torch.utils.data import DataLoader

    from wlshear.calibration.fit_surface import compose_data
    from wlshear.data.datasets import GroupedShearStream
    from hydra.utils import instantiate

    path = CACHE / f"condbias_groups_{n_groups}x{k}_s{seed}.npz"
    if path.exists():
        z = np.load(path)
        return torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    dm = instantiate(compose_data([f"paths.root_dir={REPO}"]).data)
    stream = GroupedShearStream(dm.train_renderer, n_groups * k, group_size=k, seed=seed, chunk=64, same_noise=True)
    xs, ys = [], []
    for x, y in DataLoader(stream, batch_size=None, num_workers=workers):
        xs.append(x)
        ys.append(y)
    x, y = torch.stack(xs), torch.stack(ys)
    np.savez(path, x=x.numpy(), y=y.numpy())
    return x, y


def finetune(base_est, x, y, objective, epochs: int, seed: int, groups_per_batch: int = 16):
    """Fine-tune a copy of base_est.net on grouped stamps with ``objective`` (ShearRegressor)."""
    import copy

    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from wlshear.models.module import ShearRegressor

    L.seed_everything(seed, verbose=False)
    net = copy.deepcopy(base_est.net).train()
    model = ShearRegressor(net, objective=objective)
    loader = DataLoader(TensorDataset(x, y), batch_size=groups_per_batch, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    t0 = time.time()
    trainer.fit(model, train_dataloaders=loader)
    return model.net.eval(), time.time() - t0, {k: float(v) for k, v in trainer.callback_metrics.items()}


def table_rows(rows, observable):
    return [r for r in rows if r["observable"] == observable]


def md_table(rows, names, observables=("mag", "hlr_px")) -> str:
    """Markdown: one line per (observable bin), columns per estimator 'm1 / m2 ± err, sigma'."""
    out = []
    for o in observables:
        rr = [r for r in rows if r["observable"] == o]
        bins = sorted({r["bin"] for r in rr})
        out.append(f"\n**bins of measured {o}** (pair-mean; m = (m1 + m2)/2 ± its error; sigma = per-galaxy RMS of the "
                   "delivered estimate, mean of both components)\n")
        out.append("| bin | " + " | ".join(f"{n}: m | {n}: sigma" for n in names) + " |")
        out.append("|---|" + "---|---|" * len(names))
        for b in bins:
            cells = []
            lo = hi = None
            for n in names:
                r = next((r for r in rr if r["bin"] == b and r["estimator"] == n), None)
                if r is None or "m1" not in r:
                    cells += ["n/a", "n/a"]
                    continue
                lo, hi = r["lo"], r["hi"]
                m = 0.5 * (r["m1"] + r["m2"])
                me = 0.5 * np.hypot(r["m1_err"], r["m2_err"])
                s = 0.5 * (r["sigma1_fixed"] + r["sigma2_fixed"])
                cells += [f"{m:+.3f} ± {me:.3f}", f"{s:.3f}"]
            out.append(f"| {lo:.3g}-{hi:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def overall(g_true, est: dict, pid) -> dict:
    from wlshear.tasks.evaluate import bias_summary

    out = {}
    for n, (g, f) in est.items():
        s = bias_summary(g_true, g, f, pid)
        ok = ~f & np.all(np.isfinite(g), 1)
        s["sigma_delivered"] = float(np.sqrt(np.mean((g[ok] - g_true[ok]) ** 2)))
        out[n] = {k: s[k] for k in ("m1", "m1_err", "m2", "m2_err", "c1", "c1_err", "c2", "c2_err", "sigma1",
                                    "sigma2", "n_failed")} | {"sigma_delivered": s["sigma_delivered"]}
    return out


def chi2_m(rows, name, observable) -> tuple[float, int, float]:
    """sum over bins and components of (m / m_err)^2, its dof, and max |m| over bins."""
    rr = [r for r in rows if r["estimator"] == name and r["observable"] == observable and "m1" in r]
    vals = [(r[f"m{k}"], r[f"m{k}_err"]) for r in rr for k in (1, 2)]
    return (float(sum((m / e) ** 2 for m, e in vals)), len(vals), float(max(abs(m) for m, _ in vals)))


# ---------------------------------------------------------------------------------------------------
# --target: the issue's target on large torch-rendered parametric sets (surface only)

TARGET_BINS = {"mag": 5, "hlr_px": 3}


def _predict_cached(est, est_path, s, tag, batch_size=256):
    """Symmetrised, surface-free predictions and observables of set ``s``, cached in outputs/condbias."""
    import hashlib

    from wlshear.observables import measure_observables

    h = hashlib.sha1(f"{Path(est_path).resolve()}:{Path(est_path).stat().st_mtime}:{s.key}".encode()).hexdigest()[:10]
    path = REPO / "outputs" / "condbias" / f"target_pred_{tag}_{h}.npz"
    if path.exists():
        z = np.load(path)
        return z["g"], z["failed"], {k[4:]: z[k] for k in z.files if k.startswith("obs_")}, path
    g, f = est.predict_with_flags(s.batch.stamps, symmetrize=True, batch_size=batch_size, apply_surface=False)
    obs = measure_observables(s.batch.stamps)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, g=g, failed=f, **{f"obs_{k}": v for k, v in obs.items()})
    return g, f, obs, path


def _apply_cal(g, cal):
    out = np.array(g, dtype=np.float64, copy=True)
    for k in (1, 2):
        out[:, k - 1] = (out[:, k - 1] - cal[f"c{k}"]) / (1 + cal[f"m{k}"])
    return out


def _target_table(rows, names, observables=("mag", "hlr_px")) -> list[str]:
    """Per-bin m1, m2, mean m with errors and the target verdict (|m| < 0.01)."""
    out = []
    for o in observables:
        out += ["", f"**bins of measured {o}** (quantiles of the pair-mean observable on the test set)", "",
                "| bin | " + " | ".join(f"{n}: m1 | {n}: m2 | {n}: m=(m1+m2)/2 | {n}: sigma" for n in names) + " |",
                "|---|" + "---|---|---|---|" * len(names)]
        bins = sorted({r["bin"] for r in rows if r["observable"] == o})
        for b in bins:
            cells, lo, hi = [], None, None
            for n in names:
                r = next(r for r in rows if r["observable"] == o and r["bin"] == b and r["estimator"] == n)
                lo, hi = r["lo"], r["hi"]
                m, me = 0.5 * (r["m1"] + r["m2"]), 0.5 * np.hypot(r["m1_err"], r["m2_err"])
                cells += [f"{r['m1']:+.4f} ± {r['m1_err']:.4f}", f"{r['m2']:+.4f} ± {r['m2_err']:.4f}",
                          f"{m:+.4f} ± {me:.4f}", f"{0.5 * (r['sigma1_fixed'] + r['sigma2_fixed']):.4f}"]
            out.append(f"| {lo:.3g}-{hi:.3g} | " + " | ".join(cells) + " |")
    return out


def _verdict(rows, name, tol=0.01) -> tuple[bool, list[str]]:
    """Target met if |m1| and |m2| < tol in every bin. Notes list the bins that miss (by how many
    sigma |m| exceeds tol) and those inside tol where |m| + 2 m_err >= tol (not shown at 2 sigma)."""
    notes, met = [], True
    for r in rows:
        if r["estimator"] != name or "m1" not in r:
            continue
        for k in (1, 2):
            m, e = r[f"m{k}"], r[f"m{k}_err"]
            if abs(m) >= tol:
                met = False
                notes.append(f"{r['observable']} bin {r['bin']} ({r['lo']:.3g}-{r['hi']:.3g}) m{k} = {m:+.4f} ± {e:.4f}: "
                             f"|m| exceeds {tol} by {(abs(m) - tol) / e:.1f} sigma")
            elif abs(m) + 2 * e >= tol:
                notes.append(f"{r['observable']} bin {r['bin']} ({r['lo']:.3g}-{r['hi']:.3g}) m{k} = {m:+.4f} ± {e:.4f}: "
                             f"inside {tol} but |m| + 2 sigma = {abs(m) + 2 * e:.4f} (not shown at 2 sigma)")
    return met, notes


class _Joined:
    """Several independent ring-pair sets as one (pair ids offset so they stay unique)."""

    def __init__(self, sets):
        from types import SimpleNamespace

        pids, off = [], 0
        for s in sets:
            p = np.asarray(s.batch.meta["pair_id"]).astype(np.int64)
            pids.append(p + off)
            off += int(p.max()) + 1
        self.batch = SimpleNamespace(shear=np.concatenate([s.batch.shear for s in sets]),
                                     meta={"pair_id": np.concatenate(pids)},
                                     failures=[f for s in sets for f in s.batch.failures])
        self.n = len(self.batch.shear)
        self.path = [str(s.path) for s in sets]

    def __len__(self):
        return self.n


def target_study(args, argv) -> int:
    import datetime

    import torch

    torch.set_num_threads(2)
    from _machine import machine_header
    from condbias_sets import TORCH_SETS
    from wlshear.calibration import residual_chi2, select_surface
    from wlshear.metrics.conditional import conditional_rows
    from wlshear.metrics.plots import plot_conditional
    from wlshear.models.estimator import ShearEstimator, load_estimator

    t_start = time.time()
    log = []

    def say(msg):
        print(msg, flush=True)
        log.append(msg)

    est_path = Path(args.estimator) if args.estimator else newest_estimator()
    if est_path is None or not est_path.is_file():
        print("no trained estimator; pass --estimator")
        return 1
    base = load_estimator(est_path)
    say(f"estimator {est_path}")
    sets = {}
    test_keys = ["test"] + [f"test{j + 2}" for j in range(args.extra_test)]
    for key, n in [("cal", args.n_cal)] + [(k, args.n_test) for k in test_keys]:
        seed, name = TORCH_SETS[key]
        sets[key] = cached(parametric_renderer(backend="torch"), n, seed, name, args.workers)
    say(f"torch-rendered sets: cal {len(sets['cal'])}, test {sum(len(sets[k]) for k in test_keys)} stamps "
        f"({len(test_keys)} independent set(s), seeds {[TORCH_SETS[k][0] for k in test_keys]}) "
        f"({time.time() - t_start:.0f} s)")
    pred = {}
    for key, s in sets.items():
        t0 = time.time()
        pred[key] = _predict_cached(base, est_path, s, key)
        say(f"{key}: symmetrised predictions + observables {time.time() - t0:.0f} s ({pred[key][3].name})")
    test_all = _Joined([sets[k] for k in test_keys])
    pred_test = (np.concatenate([pred[k][0] for k in test_keys]), np.concatenate([pred[k][1] for k in test_keys]),
                 {o: np.concatenate([pred[k][2][o] for k in test_keys]) for o in pred["test"][2]}, None)
    gs = {}
    if args.galsim_test:
        s = cached(parametric_renderer(), args.galsim_test, 8002, "condbias_test", args.workers)
        t0 = time.time()
        gs["galsim_test"] = (s, _predict_cached(base, est_path, s, "galsim_test"))
        say(f"GalSim test set {len(s)} stamps (seed 8002, as the earlier sections): {time.time() - t0:.0f} s")

    cb = sets["cal"].batch
    g0, f0, obs0, _ = pred["cal"]
    pid0 = cb.meta["pair_id"]
    gcal = compose_cal(base.calibration, global_cal(cb.shear, g0, pid0))
    glob = global_cal(cb.shear, g0, pid0)
    g_u = _apply_cal(g0, glob)
    uncond = ShearEstimator(base.net, calibration=gcal, metadata={**base.metadata, "condbias": "global recalibration "
                                                                 "on the torch-rendered calibration set"})
    t0 = time.time()
    surf, best, table = select_surface(cb.shear, g_u, obs0, pid0, f0, holdout_fraction=0.5, seed=8103,
                                       verbose=True)
    say(f"surface selection over {len(table)} candidates on a held-out half of the calibration set "
        f"({time.time() - t0:.0f} s): best {best}; refitted on all: {surf}")
    surf.diagnostics.update(symmetrize=True, n_stamps=len(cb), source_estimator=str(est_path), renderer="torch")
    work = REPO / "outputs" / "condbias"
    surface_est = ShearEstimator(base.net, calibration=gcal, metadata=uncond.metadata, surface=surf)
    surface_est.save(work / "estimator_surface_target.pt")
    surf.save(work / "surface_target.json")
    # the previous default (poly 3, 2 stages), refitted on the big calibration set, for comparison
    from wlshear.calibration import fit_surface

    surf_p3 = fit_surface(cb.shear, g_u, obs0, pair_ids=pid0, failed=f0, degree=3, n_stages=2)

    evals = {"test (torch)": (test_all, pred_test)} | {"test (GalSim)": v for v in gs.values()}
    res = {"estimator": str(est_path), "args": vars(args), "selection": table[:15], "best": best,
           "surface": surf.to_dict(), "sets": {}}
    date = datetime.date.today().isoformat()
    md = ["", f"## Issue #8 target on large torch-rendered sets ({date})", "", "```", machine_header(),
          "python benchmarks/condbias_sets.py --backend torch --n-cal %d --n-test %d --extra-test %d --workers %d"
          % (args.n_cal, args.n_test, args.extra_test, args.workers),
          "command: python benchmarks/conditional_bias.py " + " ".join(argv if argv is not None else sys.argv[1:]),
          "```", "",
          f"Estimator `{est_path}` (symmetrised), one global (m, c) re-fitted on the calibration set (`uncond`). "
          f"Calibration set: {len(cb)} stamps ({len(cb) // 2} ring pairs, torch renderer, seed "
          f"{TORCH_SETS['cal'][0]}); test set: {len(test_all)} stamps ({len(test_keys)} independent torch-rendered set(s), "
          f"seeds {[TORCH_SETS[k][0] for k in test_keys]}); parametric "
          "population, natural, full CLASH noise, test-mode augmentation. `surface`: settings chosen among "
          f"{len(table)} candidates (`wlshear.calibration.select_surface`: fitted on a random half of the "
          "calibration pairs, scored by chi2(m=0) over 10 magnitude x 6 size quantile bins of the other half, "
          "sigma at most 3% above uncorrected), then refitted on the whole calibration set. `surface_p3` = the "
          "earlier default (poly degree 3, 2 stages, mag + log10 hlr) on the same calibration set. The test "
          "set is used only for the numbers below.", "",
          f"Chosen: `{best}`.", "", "Held-out selection (best 8 of the grid):", "",
          "| candidate | held-out chi2/dof | max abs m | sigma ratio |", "|---|---|---|---|"]
    for r in table[:8]:
        md.append(f"| {r['candidate']} | {r['chi2']:.1f}/{r['dof']} | {r['max_abs_m']:.4f} | {r['sigma_ratio']:.4f} |")
    for set_name, (s, (g, f, obs, _)) in evals.items():
        b = s.batch
        pid = b.meta["pair_id"]
        gu = _apply_cal(g, glob)
        est = {"uncond": (gu, f), "surface_p3": (surf_p3.apply(gu, obs), f), "surface": (surf.apply(gu, obs), f)}
        rows = conditional_rows(b.shear, est, obs, pid, TARGET_BINS,
                                {n: {"m1": 0.0, "c1": 0.0, "m2": 0.0, "c2": 0.0} for n in est})
        tag = "torch" if "torch" in set_name else "galsim"
        plot_conditional(rows, REPO / "benchmarks" / f"conditional_target_{tag}.png")
        ov = overall(b.shear, est, pid)
        res["sets"][set_name] = {"n": len(s), "rows": rows, "overall": ov, "cache": str(s.path)}
        md += ["", f"### {set_name}: {len(s)} stamps ({len(s) // 2} ring pairs)", "",
               "| estimator | m1 (all) | m2 (all) | sigma (delivered) | ratio to uncond | chi2(m=0)/dof, 5 mag bins "
               "| max abs m, mag | chi2/dof, 3 hlr bins | max abs m, hlr | all abs m < 0.01 | all abs m + 2 err < 0.01 |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        verdicts = {}
        for n in est:
            o = ov[n]
            cm, dm, mm = chi2_m(rows, n, "mag")
            ch, dh, mh = chi2_m(rows, n, "hlr_px")
            met, notes = _verdict(rows, n)
            verdicts[n] = (met, notes)
            ratio = o["sigma_delivered"] / ov["uncond"]["sigma_delivered"]
            md.append(f"| {n} | {o['m1']:+.4f} ± {o['m1_err']:.4f} | {o['m2']:+.4f} ± {o['m2_err']:.4f} | "
                      f"{o['sigma_delivered']:.4f} | {ratio:.4f} | {cm:.1f}/{dm} | {mm:.4f} | {ch:.1f}/{dh} | {mh:.4f} | "
                      f"{'yes' if met else 'no'} | {'yes' if met and not notes else 'no'} |")
        md += _target_table(rows, list(est))
        for n in ("surface_p3", "surface"):
            met, notes = verdicts[n]
            md += ["", f"`{n}`: " + ("all 16 per-bin, per-component |m| < 0.01" if met else "|m| >= 0.01 somewhere")
                   + ("; every bin also has |m| + 2 err < 0.01." if not notes else "; bins where it fails or is not shown at 2 sigma:")]
            md += [f"- {x}" for x in notes]
        md.append(f"\n![conditional target {tag}](conditional_target_{tag}.png)")
    md += ["", "Log:", ""] + [f"- {x}" for x in log] + ["", f"Wall time {time.time() - t_start:.0f} s.", ""]
    res["log"] = log
    out = Path(args.out)
    jpath = out.with_suffix(".json")
    prev = json.loads(jpath.read_text()) if jpath.exists() else {}
    prev[f"target_study_{date}"] = res
    jpath.write_text(json.dumps(prev, indent=1, default=float))
    mdp = out.with_suffix(".md")
    mdp.write_text((mdp.read_text() if mdp.exists() else "# Conditional shear bias (issue #8)\n") + "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimator", default=None)
    ap.add_argument("--n-cal", type=int, default=48000)
    ap.add_argument("--n-test", type=int, default=40000)
    ap.add_argument("--n-real", type=int, default=4000)
    ap.add_argument("--n-groups", type=int, default=3000)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=6)
    ap.add_argument("--slope-weight", type=float, default=5.0)
    ap.add_argument("--no-control", action="store_true")
    # chosen on a held-out half of the calibration set (never the test set): poly degree 3 with two
    # stages gave chi2(m = 0) = 26 / 16 over 5 mag + 3 hlr bins vs 103 (one stage), 72 (degree 2)
    ap.add_argument("--surface-degree", type=int, default=3)
    ap.add_argument("--surface-stages", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS_condbias"))
    ap.add_argument("--target", action="store_true",
                    help="issue #8 target study on large torch-rendered sets (surface only, appends a section "
                         "to RESULTS_condbias.md); --n-cal/--n-test then default to 300000")
    ap.add_argument("--extra-test", type=int, default=0, choices=[0, 1, 2],
                    help="with --target: add this many further independent torch test sets (test2, test3)")
    ap.add_argument("--galsim-test", type=int, default=0,
                    help="with --target: also evaluate on this many GalSim-rendered test stamps (seed 8002)")
    args = ap.parse_args(argv)
    if args.target:
        if "--n-cal" not in (argv if argv is not None else sys.argv):
            args.n_cal = 300000
        if "--n-test" not in (argv if argv is not None else sys.argv):
            args.n_test = 300000
        return target_study(args, argv)
    t_start = time.time()

    import torch

    torch.set_num_threads(2)
    from _machine import machine_header
    from wlshear.baselines import KSBEstimator, WLENetEstimator
    from wlshear.observables import measure_observables
    from wlshear.calibration import fit_surface
    from wlshear.metrics.conditional import conditional_rows
    from wlshear.metrics.plots import plot_conditional
    from wlshear.models.estimator import ShearEstimator, load_estimator
    from wlshear.models.objectives import ConditionalBiasLoss, MSEObjective

    est_path = Path(args.estimator) if args.estimator else newest_estimator()
    if est_path is None or not est_path.is_file():
        print("no trained estimator (outputs/train/runs/*/estimator_refit.pt); train one first")
        return 1
    work = REPO / "outputs" / "condbias"
    work.mkdir(parents=True, exist_ok=True)
    base = load_estimator(est_path)
    log = []

    def say(msg):
        print(msg, flush=True)
        log.append(msg)

    say(f"estimator {est_path}")
    cal_set = cached(parametric_renderer(), args.n_cal, 8001, "condbias_cal", args.workers)
    test_set = cached(parametric_renderer(), args.n_test, 8002, "condbias_test", args.workers)
    real_set = cached(real_renderer(), args.n_real, 8003, "condbias_real", args.workers)
    say(f"sets: cal {len(cal_set)}, test {len(test_set)}, real {len(real_set)} stamps ({time.time() - t_start:.0f} s)")

    def pred(e, s, surface=True):
        return e.predict_with_flags(s.batch.stamps, symmetrize=True, batch_size=256, apply_surface=surface)

    cb = cal_set.batch
    cal_obs = measure_observables(cb.stamps)
    cal_pid = cb.meta["pair_id"]

    # (0) unconditional: one global (m, c) re-fitted on the calibration set
    g0, f0 = pred(base, cal_set)
    uncond = ShearEstimator(base.net, calibration=compose_cal(base.calibration, global_cal(cb.shear, g0, cal_pid)),
                            metadata={**base.metadata, "condbias": "global recalibration on the calibration set"})
    uncond.save(work / "estimator_uncond.pt")
    g_u, f_u = pred(uncond, cal_set)

    # (a) calibration surface on top of the unconditional estimator
    surf = fit_surface(cb.shear, g_u, cal_obs, pair_ids=cal_pid, failed=f_u, features=("mag", "log10_hlr"),
                       basis="poly", degree=args.surface_degree, n_stages=args.surface_stages)
    surf.diagnostics.update(symmetrize=True, n_stamps=len(cb), source_estimator=str(est_path))
    surface_est = ShearEstimator(base.net, calibration=uncond.calibration, metadata=uncond.metadata, surface=surf)
    surface_est.save(work / "estimator_surface.pt")
    surf.save(work / "surface.json")
    say(f"surface fitted: {surf} ({time.time() - t_start:.0f} s)")

    # (b) objective: fine-tune on grouped stamps; (control) the same with plain MSE
    t0 = time.time()
    gx, gy = grouped_set(args.n_groups, args.group_size, seed=8004, workers=args.workers)
    say(f"grouped set: {gx.shape[0]} groups x {gx.shape[1]} stamps ({time.time() - t0:.0f} s)")
    variants = {"objective": ConditionalBiasLoss(slope_weight=args.slope_weight)}
    if not args.no_control:
        variants["mse_control"] = MSEObjective()
    tuned = {}
    for name, obj in variants.items():
        net, secs, metrics = finetune(base, gx, gy, obj, args.finetune_epochs, seed=8005)
        e = ShearEstimator(net, metadata={"condbias": f"fine-tuned from {est_path} with {obj!r}, "
                                                      f"{args.finetune_epochs} epochs over {gx.shape[0]} groups"})
        g1, _ = pred(e, cal_set)
        e.set_calibration(**global_cal(cb.shear, g1, cal_pid))
        e.save(work / f"estimator_{name}.pt")
        tuned[name] = e
        say(f"fine-tuned {name} ({obj!r}): {secs:.0f} s, final train metrics {metrics}")

    cnns = {"uncond": uncond, "surface": surface_est, **tuned}
    results = {"estimator": str(est_path), "args": vars(args), "sets": {}, "tables": {}, "overall": {}}
    md = ["# Conditional shear bias (issue #8)", "", "```", machine_header(),
          "command: python benchmarks/conditional_bias.py " + " ".join(argv if argv is not None else sys.argv[1:]),
          "```", ""]
    for set_name, s in (("parametric_test", test_set), ("cosmos_real_100", real_set)):
        b = s.batch
        pid = b.meta["pair_id"]
        est = {n: pred(e, s) for n, e in cnns.items()}
        names = list(cnns)
        if set_name == "cosmos_real_100":
            for bname, bl in (("wlenet", WLENetEstimator()), ("ksb", KSBEstimator())):
                t0 = time.time()
                g, f = bl.estimate(b.stamps)
                g = np.asarray(g, dtype=np.float64)
                f = np.asarray(f, bool) | ~np.all(np.isfinite(g), 1)
                est[bname] = (np.where(f[:, None], np.nan, g), f)
                names.append(bname)
                say(f"{bname} on {len(b)} real stamps: {time.time() - t0:.0f} s, {int(f.sum())} failed")
        obs = measure_observables(b.stamps)
        ident = {n: {"m1": 0.0, "c1": 0.0, "m2": 0.0, "c2": 0.0} for n in est}
        rows = conditional_rows(b.shear, est, obs, pid, BINS, ident)
        plot_conditional(rows, work / f"conditional_{set_name}.png")
        ov = overall(b.shear, est, pid)
        results["sets"][set_name] = {"n": len(b), "n_render_failed": len(b.failures), "cache": str(s.path)}
        results["tables"][set_name] = rows
        results["overall"][set_name] = ov
        md += [f"## {set_name}: {len(b)} stamps ({len(b) // 2} ring pairs)", ""]
        md += ["Whole set: m, c from the ring-pair fit; sigma (delivered) = RMS(estimate - truth) per galaxy and "
               "component as the estimator outputs it; sigma (recal.) = the same after re-fitting one global m, c "
               "on this set (compares precision across estimators with different overall m); ratio = sigma "
               "(delivered) / that of `uncond`. chi2(m=0) sums (m/m_err)^2 over bins and both components.", "",
               "| estimator | m1 | m2 | c1 | c2 | sigma (delivered) | ratio | sigma (recal.) | chi2(m=0)/dof, mag bins "
               "| max abs m, mag bins | chi2/dof, hlr bins | max abs m, hlr bins |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in names:
            o = ov[n]
            cm, dm, mm = chi2_m(rows, n, "mag")
            ch, dh, mh = chi2_m(rows, n, "hlr_px")
            ratio = o["sigma_delivered"] / ov["uncond"]["sigma_delivered"]
            md.append(f"| {n} | {o['m1']:+.3f} ± {o['m1_err']:.3f} | {o['m2']:+.3f} ± {o['m2_err']:.3f} | "
                      f"{o['c1']:+.4f} ± {o['c1_err']:.4f} | {o['c2']:+.4f} ± {o['c2_err']:.4f} | "
                      f"{o['sigma_delivered']:.4f} | {ratio:.3f} | {0.5 * (o['sigma1'] + o['sigma2']):.4f} | "
                      f"{cm:.1f}/{dm} | {mm:.3f} | {ch:.1f}/{dh} | {mh:.3f} |")
        errs = [r[f"m{k}_err"] for r in rows if r["estimator"] == "surface" and r["observable"] == "mag" and "m1" in r
                for k in (1, 2)]
        if errs:
            e = float(np.median(errs))
            need = int(len(b) * (e / 0.003) ** 2)
            md += ["", f"Scale: the median per-bin error of m (surface, 5 magnitude bins) is {e:.4f} with {len(b)} "
                       f"stamps; verifying |m| < 0.01 per bin at ~3 sigma (m_err <= 0.003) needs about {need:,} "
                       "ring-pair stamps of this set (errors scale as 1/sqrt(N))."]
        md.append(md_table(rows, names, ("mag", "hlr_px", "snr")))
        md.append(f"![conditional bias {set_name}](../outputs/condbias/conditional_{set_name}.png)\n")
    md += ["## Log", ""] + [f"- {x}" for x in log] + ["", f"Wall time {time.time() - t_start:.0f} s."]
    results["log"] = log
    results["wall_time_s"] = time.time() - t_start
    Path(args.out + ".json").write_text(json.dumps(results, indent=1, default=float))
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
