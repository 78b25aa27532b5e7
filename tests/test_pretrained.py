"""The estimator shipped with the package: loadable by name, small, documented, and a known input
shear comes back from stamps of the population it was trained on (test-side galaxies only)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from hydra.utils import instantiate

import wlshear
from wlshear.metrics.bias import fit_bias
from wlshear.models.pretrained import DEFAULT, PRETRAINED, model_card, pretrained_path
from wlshear.utils.hydra import compose_config


def test_shipped_estimators_load_by_name():
    assert DEFAULT in PRETRAINED
    for name in PRETRAINED:
        path = pretrained_path(name)
        assert path.stat().st_size < 1_000_000
        est = wlshear.load_estimator(name)
        assert est.metadata.get("untrained") is not True
        assert any(v != 0 for v in est.calibration.values()), "the shipped estimator carries its fitted calibration"
        card = model_card(name)
        assert "## Figures" in card and "python " in card  # measured figures and the commands behind them
        cfg = yaml.safe_load(path.with_suffix(".yaml").read_text())
        assert cfg["data"]["source"]["_target_"] == "wlshear.sim.structured.StructuredSource"
    with pytest.raises(FileNotFoundError, match="clash-parametric"):
        wlshear.load_estimator("no-such-estimator")
    with pytest.raises(KeyError, match="available"):
        pretrained_path("no-such-estimator")


def test_known_shear_comes_back():
    """Ring-paired stamps of test-side galaxies of the training population at full noise:
    g_est = (1 + m) g_true + c with |m| < 0.08 (~3 sigma for 4,000 stamps) and |c| < 0.01."""
    est = wlshear.load_estimator(DEFAULT)
    cfg = compose_config("evaluate", ["data/source=structured"])
    dm = instantiate(cfg.data)
    batch = dm.eval_renderer.with_backend("torch").simulate(4000, seed=[2026, 12, 4], ring=True)
    g = est.predict(batch.stamps[:, None], symmetrize=True)
    truth = np.stack([batch.meta["g1"], batch.meta["g2"]], 1)
    fit = fit_bias(truth, g, pair_ids=batch.meta["pair_id"])
    assert np.all(np.abs(fit.m) < 0.08), fit.m
    assert np.all(np.abs(fit.c) < 0.01), fit.c
    assert np.all(fit.sigma < 0.23), fit.sigma  # below the classical estimators' ~0.24 on this population
