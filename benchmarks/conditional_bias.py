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
    args = ap.parse_args(argv)
    t_start = time.time()

    import torch

    torch.set_num_threads(2)
    from _machine import machine_header
    from wlshear.baselines import KSBEstimator, WLENetEstimator
    from wlshear.baselines.photometry import measure_observables
    from wlshear.calibration import fit_surface
    from wlshear.metrics.conditional import conditional_rows, plot_conditional
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
