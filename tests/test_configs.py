"""Every config in conf/ composes with train.yaml, and its objects instantiate where that needs no
data download or GPU (nets, callbacks, loggers into tmp dirs, CPU trainers, parametric source)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import REPO, SHARED

CONF = REPO / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(tmp_path: Path, overrides=(), hydra_cfg: bool = False):
    GlobalHydra.instance().clear()
    base = [f"paths.root_dir={REPO}", f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs",
            f"paths.cache_dir={tmp_path}/cache"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train.yaml", overrides=[*base, *overrides], return_hydra_config=hydra_cfg)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    yield
    GlobalHydra.instance().clear()


def test_every_group_has_its_options():
    assert options("model") == ["paper_cnn", "paper_cnn_condbias", "paper_cnn_d4", "resnet_small", "wide_cnn"]
    assert {"cpu", "gpu", "ddp", "ddp_cpu", "ddp_multinode"} <= set(options("trainer"))
    assert {"csv", "tensorboard", "wandb", "many"} <= set(options("logger"))
    assert {"paper_clash", "ablate_no_shift", "ablate_no_magnification", "ablate_no_rotation_mirror"} <= set(
        options("experiment"))
    # basic is Hydra's built-in default launcher (a basic.yaml here would shadow its schema and make
    # Hydra print a deprecation warning on every run); joblib and submitit_slurm are documented here
    assert options("hydra/launcher") == ["joblib", "submitit_slurm"]
    assert "optuna" in options("hparams_search")


@pytest.mark.parametrize("name", options("model"))
def test_model_options_instantiate_and_run(tmp_path, name):
    cfg = _compose(tmp_path, [f"model={name}"])
    model = instantiate(cfg.model)
    out = model(torch.randn(3, 32, 32))
    assert out.shape == (3, 2)
    opt = model.configure_optimizers()
    assert isinstance(opt["optimizer"], torch.optim.RMSprop)
    assert opt["optimizer"].defaults["lr"] == pytest.approx(3e-4)


def _source_dir_ok(name: str, cfg) -> bool:
    if name in ("parametric", "structured"):
        return True
    return Path(os.path.expanduser(str(cfg.data.source.catalog_dir))).is_dir()


@pytest.mark.parametrize("name", options("data/source"))
def test_data_source_options(tmp_path, name):
    over = [f"data/source={name}"]
    if name in ("parametric", "structured"):
        over.append("data.source.n_galaxies=200")
    cfg = _compose(tmp_path, over)
    assert cfg.data.source._target_.startswith(("wlshear.sim.sources.", "wlshear.sim.structured."))
    if name in ("cosmos", "cosmos_parametric"):  # need a download: compose only
        assert cfg.data.source.use_real == (name == "cosmos")
        return
    if not _source_dir_ok(name, cfg):
        pytest.skip(f"{cfg.data.source.catalog_dir} absent: composed only")
    dm = instantiate(cfg.data)
    assert len(dm.source) > 0
    assert dm.hparams.noise_scale == 1.0


@pytest.mark.parametrize("name", options("callbacks"))
def test_callbacks_instantiate(tmp_path, name):
    from wlshear.utils.hydra import instantiate_group

    cfg = _compose(tmp_path, [f"callbacks={name}"])
    cbs = instantiate_group(cfg.get("callbacks"))
    if name == "default":
        kinds = {type(c).__name__ for c in cbs}
        assert {"ModelCheckpoint", "LearningRateMonitor", "EarlyStopping"} <= kinds
        ck = next(c for c in cbs if type(c).__name__ == "ModelCheckpoint")
        assert Path(ck.dirpath) == tmp_path / "checkpoints"
        assert ck.save_last


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate_into_tmp(tmp_path, name):
    from lightning.pytorch.loggers import WandbLogger

    from wlshear.tasks.tracking import build_loggers

    cfg = _compose(tmp_path, [f"logger={name}"])
    loggers = build_loggers(cfg, tmp_path, None)
    assert loggers
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            assert lg._offline is True  # offline by default: never touches the network
            assert (tmp_path / "wandb_id.txt").read_text().strip() == lg._wandb_init["id"]
        else:
            assert str(tmp_path) in str(lg.log_dir)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options(tmp_path, name):
    cfg = _compose(tmp_path, [f"trainer={name}"])
    t = cfg.trainer
    expect = {"cpu": ("cpu", 1), "gpu": ("gpu", 1), "ddp": ("gpu", 4), "ddp_multinode": ("gpu", 4),
              "ddp_cpu": ("cpu", 2), "default": ("cpu", 1)}
    if name in expect:
        assert (t.accelerator, t.devices) == expect[name]
    if name.startswith("ddp"):
        # the training stream shards itself by rank; a DistributedSampler must not be injected
        assert t.use_distributed_sampler is False
        assert "ddp" in t.strategy
    if name == "ddp_multinode":
        assert t.num_nodes == 2
    if t.accelerator == "gpu" and not torch.cuda.is_available():
        return  # composed only
    trainer = instantiate(t, logger=False, enable_progress_bar=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_debug_fast_composes(tmp_path):
    cfg = _compose(tmp_path, ["debug=fast"])
    assert cfg.trainer.max_epochs == 1 and cfg.data.num_workers == 0


def test_debug_fast_eval_composes_with_evaluate(tmp_path):
    """evaluate.py's small-size option (the README test appends it to `python evaluate.py ...`)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        full = compose("evaluate.yaml", overrides=[f"paths.root_dir={tmp_path}"])
        cfg = compose("evaluate.yaml", overrides=[f"paths.root_dir={tmp_path}", "debug=fast_eval"])
    assert full.test.n == 150000 and cfg.test.n == 64 and cfg.bootstrap < full.bootstrap
    assert cfg.studies.noise.n < full.studies.noise.n and cfg.studies.centroid.n < full.studies.centroid.n
    # same galaxies as a debug=fast training run, so evaluate finds no train/test config mismatch
    fast = _compose(tmp_path, ["debug=fast"])
    assert cfg.data.source.n_galaxies == fast.data.source.n_galaxies
    assert cfg.data.source.p_knots == fast.data.source.p_knots


def test_paper_clash_experiment(tmp_path):
    cfg = _compose(tmp_path, ["experiment=paper_clash"])
    assert cfg.data.batch_size == 100
    assert cfg.data.samples_per_epoch == 225000
    assert cfg.trainer.max_epochs == 100
    assert cfg.trainer.accelerator == "gpu"
    assert cfg.refit.n == 300000 and cfg.data.refit_size == 300000
    assert cfg.data.source._target_ == "wlshear.sim.sources.CosmosSource" and cfg.data.source.use_real
    assert cfg.data.eval_population == "matched"
    assert cfg.data.target_catalog is None  # the user must supply it (checked at start)
    assert cfg.data.num_workers >= 4
    assert cfg.callbacks.early_stopping is None
    m = cfg.model
    assert (m.optimizer.lr, m.optimizer.alpha, m.optimizer.eps) == (3e-4, 0.9, 1e-8)
    assert m.scheduler.factor == pytest.approx(0.1**0.5) and m.scheduler.patience == 10
    assert m.scheduler.min_lr == 2e-6


def test_paper_clash_requires_target_catalog(tmp_path):
    from wlshear.tasks.preflight import check_required

    cfg = _compose(tmp_path, ["experiment=paper_clash"])
    with pytest.raises(ValueError, match="data.target_catalog"):
        check_required(cfg)
    check_required(_compose(tmp_path, ["experiment=paper_clash", "data.target_catalog=x.csv"]))


@pytest.mark.parametrize("name,key,value", [
    ("ablate_no_shift", "shift", 0.0),
    ("ablate_no_magnification", "magnification", None),
    ("ablate_no_rotation_mirror", "rotation", False),
])
def test_ablations_change_only_their_augmentation(tmp_path, name, key, value):
    base = _compose(tmp_path, ["experiment=paper_clash", "data.target_catalog=x.csv"])
    cfg = _compose(tmp_path, [f"experiment={name}", "data.target_catalog=x.csv"])
    assert cfg.data.augment[key] == value
    if name == "ablate_no_rotation_mirror":
        assert cfg.data.augment.mirror is False
    a, b = OmegaConf.to_container(base, resolve=True), OmegaConf.to_container(cfg, resolve=True)
    a.pop("tags"), b.pop("tags")
    diff = {k for k in a["data"]["augment"] if a["data"]["augment"][k] != b["data"]["augment"][k]}
    a["data"].pop("augment"), b["data"].pop("augment")
    assert a == b  # everything else is paper_clash
    assert diff == ({"rotation", "mirror"} if name == "ablate_no_rotation_mirror" else {key})


def test_experiment_with_demo_source_and_population(tmp_path):
    """The noise sweep's composition at demo scale: paper_clash + parametric source + matched set."""
    import numpy as np

    cat = tmp_path / "clash.csv"
    rng = np.random.default_rng(0)
    np.savetxt(cat, np.c_[rng.uniform(22, 26, 100), rng.uniform(1.5, 6, 100)], delimiter=",",
               header="mag,hlr_px", comments="")
    cfg = _compose(tmp_path, ["experiment=paper_clash", "data/source=parametric", "trainer=cpu", "debug=fast",
                              f"data.target_catalog={cat}", "data.noise_scale=0.25"])
    assert cfg.data.source._target_ == "wlshear.sim.sources.ParametricSource"
    assert cfg.trainer.accelerator == "cpu" and cfg.data.samples_per_epoch == 64
    dm = instantiate(cfg.data)
    assert dm.hparams.eval_population == "matched" and dm.hparams.noise_scale == 0.25


def test_hparams_search_optuna_composes(tmp_path):
    cfg = _compose(tmp_path, ["hparams_search=optuna"], hydra_cfg=True)
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("OptunaSweeper")
    assert sw.direction == "minimize" and sw.storage is None
    assert sw.sampler._target_ == "optuna.samplers.TPESampler"
    assert set(sw.params) == {"model.optimizer.lr", "data.batch_size", "model.net.dropout"}
    assert cfg.optimized_metric == "val_mse"


@pytest.mark.parametrize("name", ["basic", *options("hydra/launcher")])
def test_launchers_compose(tmp_path, name):
    cfg = _compose(tmp_path, [f"hydra/launcher={name}"], hydra_cfg=True)
    target = {"basic": "BasicLauncher", "joblib": "JoblibLauncher", "submitit_slurm": "SlurmLauncher"}[name]
    assert cfg.hydra.launcher._target_.endswith(target)
    if name == "submitit_slurm":
        for k in ("partition", "gpus_per_node", "tasks_per_node", "timeout_min", "mem_gb", "setup"):
            assert k in cfg.hydra.launcher
    if name != "submitit_slurm":  # submitit's folder interpolates the sweep dir: fine unresolved
        instantiate_target = cfg.hydra.launcher._target_
        mod, cls = instantiate_target.rsplit(".", 1)
        __import__(mod, fromlist=[cls])  # the plugin is installed


@pytest.mark.parametrize("name", ["basic", *options("hydra/launcher")])
def test_sweep_dir_resolves_from_default_paths(tmp_path, monkeypatch, name):
    """What every sweeper/launcher does before a job runs: resolve hydra.sweep.dir (and submitit's
    folder) while HydraConfig is unset, with the default paths (no paths.* or hydra.*dir overrides)
    of an entry point started in tmp_path. Outputs and the stamp cache land under that directory."""
    from wlshear.utils.hydra import set_project_root

    monkeypatch.setenv("PROJECT_ROOT", "placeholder")  # so that monkeypatch restores the caller's value
    monkeypatch.delenv("PROJECT_ROOT")
    monkeypatch.chdir(tmp_path)
    root = Path.cwd()
    assert set_project_root() == str(root)
    assert set_project_root() == str(root)  # idempotent; an explicit $PROJECT_ROOT is kept
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    assert not HydraConfig.initialized()
    sweep = Path(cfg.hydra.sweep.dir)
    assert sweep.parent == root / "outputs" / "train" / "multiruns"
    assert Path(cfg.hydra.run.dir).parent == root / "outputs" / "train" / "runs"
    assert cfg.paths.cache_dir == f"{root}/data_cache"  # one cache for every job of a sweep
    if name == "submitit_slurm":
        assert cfg.hydra.launcher.submitit_folder == f"{sweep}/.submitit/%j"


def test_run_dirs_are_unique_per_job(tmp_path):
    cfg = _compose(tmp_path, [], hydra_cfg=True)
    h = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert "%f" in h["run"]["dir"] and "%f" in h["sweep"]["dir"]  # microseconds
    assert h["sweep"]["subdir"] == "${hydra.job.num}"


def test_cosmos_real_100_source_when_present(tmp_path):
    d = SHARED / "data" / "cosmos_real_100"
    if not d.is_dir():
        pytest.skip(f"needs {d}")
    cfg = _compose(tmp_path, ["experiment=paper_clash", "data/source=cosmos_real_100",
                              "data.target_catalog=x.csv"])
    src = instantiate(cfg.data.source)
    assert len(src) > 0


NOISE_LEVELS = {"full": 1.0, "half": 0.5, "quarter": 0.25, "none": 0.0}


def test_every_noise_group_has_its_level():
    assert set(options("data/noise")) == set(NOISE_LEVELS)


@pytest.mark.parametrize("experiment", [None, *options("experiment")])
@pytest.mark.parametrize("noise", sorted(NOISE_LEVELS))
def test_every_experiment_composes_with_every_noise_group(tmp_path, experiment, noise):
    """data/noise=<level> sets the noise whatever the experiment (paper_clash used to pin
    data.noise_scale: 1.0, so `experiment=paper_clash data/noise=half` trained at full noise)."""
    over = ([f"experiment={experiment}"] if experiment else []) + [f"data/noise={noise}"]
    cfg = _compose(tmp_path, over)
    assert cfg.data.noise_scale == NOISE_LEVELS[noise], (experiment, noise)
    # a value on the command line still wins over the group, and the group over the default
    assert _compose(tmp_path, [*over, "data.noise_scale=0.3"]).data.noise_scale == 0.3
    default = _compose(tmp_path, [f"experiment={experiment}"] if experiment else [])
    assert default.data.noise_scale == 1.0


def test_gaussian_shear_prior_experiment_reaches_renderers_and_refit(tmp_path):
    """experiment=structured_d4_gauss trains under the truncated Gaussian prior, its head refit's
    attenuation uses that prior's variance, and the evaluation override restores the paper's set."""
    from wlshear.sim.augment import shear_variance

    cfg = _compose(tmp_path, ["experiment=structured_d4_gauss", "data/source=parametric", "debug=fast"])
    a = cfg.data.augment
    assert (a.shear_prior, a.shear_sigma, a.shear_max) == ("gaussian", 0.12, 0.45)
    dm = instantiate(cfg.data)
    var_g = dm.fit_renderer.augment.shear_var  # what train.py gives the head refit and val_mse_prior
    assert var_g == pytest.approx(shear_variance("gaussian", 0.45, 0.12))
    assert abs(var_g - 0.45**2 / 3) > 0.05  # not the uniform formula on shear_max
    assert dm.train_renderer.augment.shear_prior == "gaussian"
    assert dm.eval_renderer.augment.shear_prior == "gaussian" and dm.eval_renderer.augment.shift == 0
    std = _compose(tmp_path, ["experiment=structured_d4_gauss", "data/source=parametric", "debug=fast",
                              "data.augment.shear_prior=uniform", "data.augment.shear_max=0.2"])
    assert instantiate(std.data).fit_renderer.augment.shear_var == pytest.approx(0.2**2 / 3)
    from wlshear.tasks.relations import RELATIONS
    from wlshear.tasks.rules import TRAIN_RULES
    from wlshear.utils.validate import problems

    assert problems(cfg, TRAIN_RULES, RELATIONS) == []
    bad = problems(_compose(tmp_path, ["data.augment.shear_prior=cauchy"]), TRAIN_RULES, RELATIONS)
    assert any("data.augment.shear_prior" in p for p in bad), bad
