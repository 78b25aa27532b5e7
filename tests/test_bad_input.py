"""Bad input never yields a silent wrong answer (issue 17): each case gives a clear error naming the
problem, or a counted and flagged skip.

Sections: config validation at start-up; untrained runs; honest caches and the training stream;
COSMOS set-up; estimator input checks; estimator files; the render CLI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import FAST_GSPARAMS, REPO

CONF = str(REPO / "conf")


def _compose(name: str, tmp_path: Path, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}",
                                        f"paths.cache_dir={tmp_path / 'cache'}", *overrides])


# ------------------------------------------------------------------------------------------------
# 3. config values: typed and ranged, checked before anything is rendered

@pytest.mark.parametrize("override, message", [
    ("data.noise_scale=-1", r"data.noise_scale = -1: must be a number in \[0, 100\]"),
    ("data.noise_scale=abc", r"data.noise_scale = 'abc' \(a string\): must be a number in \[0, 100\]"),
    ("data.stamp_size=-32", r"data.stamp_size = -32: must be an integer in \[8, 256\]"),
    ("data.stamp_size=48", r"data.stamp_size = 48 but the network takes 32x32 stamps"),
    ("trainer.max_epochs=-3", r"trainer.max_epochs = -3: must be an integer >= -1"),
    ("data.augment.shear_max=1.5", r"data.augment.shear_max = 1.5: must be a number in \(0, 1\)"),
    ("model.optimizer.lr=0", r"model.optimizer.lr = 0: must be a number in \(0, 10\]"),
    ("refit.n=0", r"refit.n = 0: must be an integer >= 1"),
    ("data.backend=cuda", r"data.backend = 'cuda': must be one of 'galsim', 'torch'"),
])
def test_train_config_errors_name_key_value_and_range(tmp_path, override, message):
    from wlshear.tasks.train import run
    from wlshear.utils.validate import ConfigError

    cfg = _compose("train.yaml", tmp_path, ["debug=fast", override])
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "cache").exists()  # nothing rendered


def test_every_bad_value_is_listed_at_once(tmp_path):
    from wlshear.tasks.train import run

    cfg = _compose("train.yaml", tmp_path, ["debug=fast", "data.noise_scale=-1", "data.batch_size=0"])
    with pytest.raises(ValueError) as err:
        run(cfg)
    assert "data.noise_scale = -1" in str(err.value) and "data.batch_size = 0" in str(err.value)


def test_evaluate_and_infer_clash_configs_are_checked(tmp_path):
    from wlshear.tasks import evaluate, infer_clash
    from wlshear.utils.validate import ConfigError

    cfg = _compose("evaluate.yaml", tmp_path, ["test.n=0", "studies.noise.levels=[1.0,-0.5]"])
    with pytest.raises(ConfigError, match=r"test.n = 0: must be an integer >= 2") as err:
        evaluate.run(cfg)
    assert "studies.noise.levels = [1.0, -0.5]" in str(err.value)
    cfg = _compose("infer_clash.yaml", tmp_path, ["estimator=x.pt", "holdout_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"holdout_fraction = 1.5: must be a number in \(0, 1\)"):
        infer_clash.run(cfg)


def test_datamodule_checks_its_arguments_with_the_same_table():
    from wlshear.data import ShearDataModule
    from wlshear.sim.sources import ParametricSource
    from wlshear.utils.validate import ConfigError

    src = ParametricSource(n_galaxies=10, p_knots=0.0)
    with pytest.raises(ConfigError, match=r"data.noise_scale = 'abc': must be a number in \[0, 100\]"):
        ShearDataModule(src, noise_scale="abc")


def test_shipped_configs_pass_validation(tmp_path):
    from wlshear.utils.validate import EVALUATE_RULES, INFER_CLASH_RULES, TRAIN_RULES, problems

    for name, rules, over in [("train.yaml", TRAIN_RULES, []), ("train.yaml", TRAIN_RULES, ["debug=fast"]),
                              ("train.yaml", TRAIN_RULES, ["model=paper_cnn_condbias", "data=grouped"]),
                              ("train.yaml", TRAIN_RULES, ["experiment=paper_clash"]),
                              ("evaluate.yaml", EVALUATE_RULES, []), ("infer_clash.yaml", INFER_CLASH_RULES, [])]:
        assert problems(_compose(name, tmp_path, over), rules) == [], (name, over)


# ------------------------------------------------------------------------------------------------
# 4. COSMOS set-up

def test_debug_fast_composes_with_a_cosmos_source(tmp_path, cosmos_param_dir):
    from hydra.utils import instantiate

    cfg = _compose("train.yaml", tmp_path, ["debug=fast", "data/source=cosmos_example_23.5",
                                            f"data.source.catalog_dir={cosmos_param_dir}"])
    assert "n_galaxies" not in cfg.data.source
    src = instantiate(cfg.data.source, gsparams=FAST_GSPARAMS)
    assert len(src) == 100
    # the parametric source still gets the debug population
    cfg = _compose("train.yaml", tmp_path, ["debug=fast"])
    assert cfg.data.source.n_galaxies == 200 and cfg.data.source.p_knots == 0.0
    assert _compose("train.yaml", tmp_path).data.source.n_galaxies == 20000


# ------------------------------------------------------------------------------------------------
# 3. a run that did not train writes no estimator unless asked

def test_max_epochs_zero_refused_before_rendering(tmp_path):
    from wlshear.tasks.train import UntrainedError, run

    cfg = _compose("train.yaml", tmp_path, ["debug=fast", "trainer.max_epochs=0"])
    with pytest.raises(UntrainedError, match=r"trainer.max_epochs=0: refusing to write estimator.pt") as err:
        run(cfg)
    assert "refit.allow_untrained=true" in str(err.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "estimator_refit.pt").exists()


def test_zero_optimiser_steps_refused_after_fit(tmp_path):
    from wlshear.tasks.train import UntrainedError, run

    cfg = _compose("train.yaml", tmp_path, ["debug=fast", "+trainer.limit_train_batches=0", "data.val_size=8"])
    with pytest.raises(UntrainedError, match=r"no optimiser step ran \(trainer.global_step = 0"):
        run(cfg)
    assert not (tmp_path / "run" / "estimator.pt").exists()


def test_allow_untrained_writes_marked_estimators(tmp_path):
    from wlshear.models import load_estimator
    from wlshear.tasks.train import run

    cfg = _compose("train.yaml", tmp_path, ["debug=fast", "trainer.max_epochs=0", "refit.allow_untrained=true",
                                            "data.val_size=8", "evaluate.enabled=false"])
    run(cfg)
    for name in ("estimator.pt", "estimator_refit.pt"):
        assert load_estimator(tmp_path / "run" / name).metadata["untrained"] is True
