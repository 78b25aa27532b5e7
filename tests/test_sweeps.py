"""Multiruns of train.py: a two-architecture sweep from the default paths of a fresh clone (no sweep,
run or paths overrides) summarised with `python -m wlshear.tasks.summarize`, the demo-scale noise sweep of
experiment=paper_clash (two jobs, two run dirs, each with its resolved config, checkpoints and
metrics.json), its summary table/plot, and a two-trial Optuna search. Subprocesses, tiny settings
(a few seconds of training per job)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, copy_repo, user_env

TINY = ["debug=fast", "trainer=cpu", "data.num_workers=0", "data.samples_per_epoch=32", "data.batch_size=16",
        "data.val_size=32", "data.test_size=32", "refit.n=64", "extras.print_config=false",
        "callbacks.progress_bar.refresh_rate=0"]


def _env(tmp: Path) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp),
               WANDB_CONFIG_DIR=str(tmp / "wandb_config"), HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    return env


def run_train(args: list[str], tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), *args, f"paths.log_dir={tmp}/logs", f"paths.cache_dir={tmp}/cache"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"train.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _clash_table(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savetxt(path, np.c_[rng.uniform(22, 26, 200), rng.uniform(1.5, 6, 200)], delimiter=",",
               header="mag,hlr_px", comments="")
    return path


def test_noise_sweep_multirun_and_summary(tmp_path):
    sweep = tmp_path / "sweep"
    cat = _clash_table(tmp_path / "clash.csv")
    run_train(["-m", "experiment=paper_clash", "data/source=parametric", f"data.target_catalog={cat}",
               *TINY, "data.noise_scale=1,0.5", f"hydra.sweep.dir={sweep}"], tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    noise = []
    for j in jobs:
        for f in ("metrics.json", "config_resolved.yaml", ".hydra/overrides.yaml", "checkpoints/last.ckpt"):
            assert (j / f).is_file(), f"{j}/{f} missing"
        cfg = yaml.safe_load((j / "config_resolved.yaml").read_text())
        assert cfg["paths"]["output_dir"] == str(j)  # each job wrote into its own dir
        assert cfg["data"]["eval_population"] == "matched" and cfg["data"]["batch_size"] == 16
        noise.append(cfg["data"]["noise_scale"])
        m = json.loads((j / "metrics.json").read_text())
        assert m["run_dir"] == str(j) and np.isfinite(m["val_mse"])
    assert noise == [1.0, 0.5]

    p = subprocess.run([sys.executable, "-m", "wlshear.tasks.summarize", f"dir={sweep}"], cwd=REPO, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert {r["status"] for r in rows} == {"ok"}
    assert [float(r["noise_scale"]) for r in rows] == [1.0, 0.5]
    assert all(r["model"] == "paper_cnn" and r["experiment"] == "paper_clash" for r in rows)
    assert all(float(r["sigma"]) > 0 for r in rows)
    md = (sweep / "summary.md").read_text()
    assert "| noise_scale |" in md and md.count("| ok |") == 2
    assert (sweep / "summary.png").stat().st_size > 1000


def test_default_path_multirun_and_summary(tmp_path):
    """What a new user types in a fresh clone: `python train.py -m debug=fast model=paper_cnn,wide_cnn`
    then `python -m wlshear.tasks.summarize dir=outputs/train/multiruns/<time>`. The sweep lands in
    <clone>/outputs/train/multiruns/<time>/{0,1}, both jobs share <clone>/data_cache, the refit size
    follows each architecture, and the summary lists both jobs as ok."""
    repo = copy_repo(tmp_path / "clone")
    env = user_env(tmp_path)
    p = subprocess.run([sys.executable, "train.py", "-m", "debug=fast", "model=paper_cnn,wide_cnn"], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"train.py -m failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    sweeps = list((repo / "outputs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1 and not (repo / "outputs" / "train" / "runs").exists()
    sweep = sweeps[0]
    jobs = sorted(j for j in sweep.iterdir() if j.is_dir() and j.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    refit_n = {}
    for j in jobs:
        cfg = yaml.safe_load((j / "config_resolved.yaml").read_text())
        assert cfg["paths"]["root_dir"] == str(repo) and cfg["paths"]["output_dir"] == str(j)
        assert cfg["paths"]["cache_dir"] == str(repo / "data_cache")
        m = json.loads((j / "metrics.json").read_text())
        refit_n[cfg["model"]["net"]["_target_"].rsplit(".", 1)[1]] = m["refit"]["n"]
    assert refit_n == {"PaperCNN": 62, "WideCNN": 130}  # refit.n=auto: 2 x (d + 1)
    # one cache for the sweep: the jobs share the validation and test sets, each has its refit set
    cache = sorted(f.name.split("_")[0] for f in (repo / "data_cache").glob("*.npz"))
    assert cache == ["refit", "refit", "test", "val"]

    rel = str(sweep.relative_to(repo))  # as typed, relative to the clone
    p = subprocess.run([sys.executable, "-m", "wlshear.tasks.summarize", f"dir={rel}"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["model"], r["status"]) for r in rows] == [("0", "paper_cnn", "ok"), ("1", "wide_cnn", "ok")]
    assert all(float(r["sigma"]) > 0 for r in rows)
    assert "| wide_cnn |" in (sweep / "summary.md").read_text()


def _fake_job(root: Path, num: int, model: str, noise: float, sigma: float | None):
    j = root / str(num)
    (j / ".hydra").mkdir(parents=True)
    (j / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model={model}", f"data.noise_scale={noise}"]))
    (j / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"model": model}}}}))
    (j / "config_resolved.yaml").write_text(yaml.safe_dump({"data": {"noise_scale": noise},
                                                            "model": {"net": {"_target_": "x.PaperCNN"}}}))
    if sigma is not None:
        summ = {"m1": 0.01, "m2": 0.03, "c1": 0.0, "c2": 0.0, "sigma1": sigma, "sigma2": sigma}
        (j / "metrics.json").write_text(json.dumps({"val_mse": 0.01, "summary": summ}))


def test_summarize_groups_by_architecture_and_reports_incomplete_jobs(tmp_path):
    from wlshear.tasks.summarize import summarize

    grid = [("paper_cnn", 1.0, 0.30), ("paper_cnn", 0.5, 0.25), ("wide_cnn", 1.0, 0.28), ("wide_cnn", 0.5, None)]
    for i, (model, noise, sigma) in enumerate(grid):
        _fake_job(tmp_path, i, model, noise, sigma)
    paths = summarize(tmp_path)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "incomplete"]
    assert [r["model"] for r in rows] == [g[0] for g in grid]
    assert float(rows[0]["sigma"]) == pytest.approx(0.30) and float(rows[0]["m"]) == pytest.approx(0.02)
    assert rows[3]["data.noise_scale"] == "0.5"  # swept keys become columns
    assert "incomplete" in paths["md"].read_text()
    assert paths["png"].is_file()


def test_summarize_rejects_empty_dir(tmp_path):
    from wlshear.tasks.summarize import main

    assert main([f"dir={tmp_path}"]) == 2


def test_optuna_search_two_trials(tmp_path):
    """hydra-optuna-sweeper (TPE, in-memory) minimises the val_mse train.py returns."""
    sweep = tmp_path / "optuna"
    run_train(["hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
               *[a for a in TINY if not a.startswith("data.batch_size")], "refit.enabled=false", "evaluate.enabled=false", f"hydra.sweep.dir={sweep}"], tmp_path)
    res = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(res["best_params"]) == {"model.optimizer.lr", "data.batch_size", "model.net.dropout"}
    vals = [json.loads((sweep / str(i) / "metrics.json").read_text())["val_mse"] for i in (0, 1)]
    assert res["best_value"] == pytest.approx(min(vals), rel=1e-6)
