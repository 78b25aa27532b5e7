"""The data config groups: sources and noise levels chosen by config, not code."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _data(tmp_path, overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train.yaml", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/o",
                                               "data.source.n_galaxies=50", *overrides])
    return cfg.data


@pytest.mark.parametrize("level,scale", [("full", 1.0), ("half", 0.5), ("quarter", 0.25), ("none", 0.0)])
def test_noise_group_sets_the_kernel_scale(tmp_path, level, scale):
    data = _data(tmp_path, [f"data/noise={level}"])
    assert data.noise_scale == scale
    dm = instantiate(data)
    if scale == 0:
        assert dm.noise is None and dm.train_renderer.noise is None
    else:
        assert dm.noise.sigma == pytest.approx(scale * 3.6033e-3, rel=1e-3)
        assert dm.eval_renderer.noise is dm.noise


def test_command_line_value_overrides_the_group(tmp_path):
    assert _data(tmp_path, ["data/noise=half", "data.noise_scale=0.3"]).noise_scale == 0.3


def test_grouped_data_config_keeps_noise_group(tmp_path):
    data = _data(tmp_path, ["data=grouped", "data/noise=quarter"])
    assert data.noise_scale == 0.25
