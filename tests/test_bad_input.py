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
    from wlshear.tasks.relations import RELATIONS
    from wlshear.tasks.rules import EVALUATE_RULES, INFER_CLASH_RULES, TRAIN_RULES
    from wlshear.utils.validate import problems

    for name, rules, over in [("train.yaml", TRAIN_RULES, []), ("train.yaml", TRAIN_RULES, ["debug=fast"]),
                              ("train.yaml", TRAIN_RULES, ["model=paper_cnn_condbias", "data=grouped"]),
                              ("train.yaml", TRAIN_RULES, ["experiment=paper_clash"]),
                              ("evaluate.yaml", EVALUATE_RULES, []), ("infer_clash.yaml", INFER_CLASH_RULES, [])]:
        assert problems(_compose(name, tmp_path, over), rules, RELATIONS) == [], (name, over)


def test_shipped_cli_configs_pass_validation(tmp_path):
    from wlshear.tasks import relations, rules
    from wlshear.utils.hydra import compose_config
    from wlshear.utils.validate import problems

    image = tmp_path / "total.fits"
    fits_bytes = np.zeros((8, 8), np.float32)
    from astropy.io import fits

    fits.PrimaryHDU(fits_bytes).writeto(image)
    est = tmp_path / "e.pt"
    est.write_bytes(b"")
    for name, table, relations, over in [
            ("render", rules.RENDER_RULES, relations.RENDER_RELATIONS, []),
            ("mock_field", rules.MOCK_FIELD_RULES, relations.MOCK_FIELD_RELATIONS, ["out=o"]),
            ("noise_kernel", rules.NOISE_KERNEL_RULES, relations.NOISE_KERNEL_RELATIONS, [f"image={image}", "out=k.npy"]),
            ("fit_surface", rules.FIT_SURFACE_RULES, relations.FIT_SURFACE_RELATIONS, [f"estimator={est}", "out=o.pt"]),
            ("summarize", rules.SUMMARIZE_RULES, (), ["dir=d"])]:
        assert problems(compose_config(name, over), table, relations) == [], name


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
    with pytest.raises(UntrainedError, match=r"no optimiser step changed the network's weights \(trainer.global_step = 0"):
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


# ------------------------------------------------------------------------------------------------
# 1. honest caches and training stream

def _file_source(path: Path, n: int):
    import galsim

    from wlshear.sim.sources import GalaxySource

    class FileGaussians(GalaxySource):
        """Round Gaussians whose half-light radii [px] are the lines of ``path``: a line missing
        from a damaged (truncated) file makes that galaxy fail to render."""

        name = "file_gaussians"

        def __init__(self):
            super().__init__()
            self.path = str(path)
            self.catalog = {"mag": np.full(n, 24.0), "mag_source": np.full(n, 24.0), "hlr_px": np.full(n, 3.0)}

        def input_files(self):
            return [Path(self.path)]

        def _build(self, i):
            lines = Path(self.path).read_text().split()
            if i >= len(lines):
                raise galsim.GalSimError(f"galaxy {i} missing from {Path(self.path).name}")
            return galsim.Gaussian(half_light_radius=float(lines[i]) * 0.065, flux=20.0)

    return FileGaussians()


def _renderer(src):
    from wlshear.sim.augment import Augmentation
    from wlshear.sim.noise import CorrelatedNoise
    from wlshear.sim.render import StampRenderer

    return StampRenderer(src, CorrelatedNoise(), Augmentation().test_mode(), gsparams=FAST_GSPARAMS)


def test_damaged_input_is_never_cached_and_repair_gives_the_clean_result(tmp_path, caplog):
    import logging

    from wlshear.data.datasets import CachedStampSet, RenderFailureError

    sizes = tmp_path / "sizes.txt"
    good = "\n".join(f"{2 + 0.1 * i:.1f}" for i in range(20)) + "\n"
    sizes.write_text(good)
    clean = CachedStampSet(_renderer(_file_source(sizes, 20)), 32, seed=1, cache_dir=tmp_path / "clean",
                           name="val", progress=False)
    assert len(clean) == 32 and not clean.batch.failures

    cache = tmp_path / "cache"
    sizes.write_text(good[: len(good) // 4])  # a damaged file: 15 of 20 galaxies lost
    with pytest.raises(RenderFailureError, match=r"val set: \d+ of 32 stamps \(\d+%\) failed to render, above "
                       r"data.max_failure_fraction = 0.01; first failures: galaxy \d+: GalSimError: galaxy \d+ "
                       r"missing from sizes.txt"):
        CachedStampSet(_renderer(_file_source(sizes, 20)), 32, seed=1, cache_dir=cache, name="val", progress=False)
    assert not list(cache.glob("*.npz"))  # nothing cached

    # a poisoned cache made under a permissive limit (or by an older version) ...
    poisoned = CachedStampSet(_renderer(_file_source(sizes, 20)), 32, seed=1, cache_dir=cache, name="val",
                              progress=False, max_failure_fraction=1.0)
    assert len(poisoned.batch.failures) > 16
    # ... is not reused under the default limit, with the reason logged
    with caplog.at_level(logging.WARNING, logger="wlshear.data.datasets"):
        with pytest.raises(RenderFailureError):
            CachedStampSet(_renderer(_file_source(sizes, 20)), 32, seed=1, cache_dir=cache, name="val",
                           progress=False)
    assert "above data.max_failure_fraction" in caplog.text and "re-rendering val set" in caplog.text

    # repairing the file changes the cache key (the file's checksum): re-rendered, same as clean
    caplog.clear()
    sizes.write_text(good)
    with caplog.at_level(logging.INFO, logger="wlshear.data.datasets"):
        repaired = CachedStampSet(_renderer(_file_source(sizes, 20)), 32, seed=1, cache_dir=cache, name="val",
                                  progress=False)
    assert repaired.key == clean.key != poisoned.key
    assert "sizes.txt" in caplog.text and "differ from the cached" in caplog.text
    np.testing.assert_array_equal(repaired.batch.stamps, clean.batch.stamps)
    np.testing.assert_array_equal(repaired.meta["galaxy_id"], clean.meta["galaxy_id"])


def test_a_few_failures_within_the_limit_are_cached_and_counted(tmp_path):
    from wlshear.data.datasets import CachedStampSet

    sizes = tmp_path / "sizes.txt"
    sizes.write_text("\n".join(["3.0"] * 19) + "\n")  # galaxy 19 of 20 is missing
    s = CachedStampSet(_renderer(_file_source(sizes, 20)), 40, seed=2, cache_dir=tmp_path, name="val",
                       progress=False, max_failure_fraction=0.2)
    assert 0 < len(s.batch.failures) <= 8 and len(s) == 40 - len(s.batch.failures)
    assert len(list(tmp_path.glob("val_*.npz"))) == 1


def test_training_stream_stops_when_most_stamps_fail(tmp_path):
    from wlshear.data.datasets import RenderFailureError, ShearStream

    sizes = tmp_path / "sizes.txt"
    sizes.write_text("3.0\n" * 5)  # 5 of 20 galaxies: 75% of stamps fail
    stream = ShearStream(_renderer(_file_source(sizes, 20)), samples_per_epoch=200, seed=0, chunk=50)
    with pytest.raises(RenderFailureError, match=r"training stream \(worker 0, epoch 0\): \d+ of \d+ stamps "
                       r"\(7\d%\) failed to render, above data.stream_max_failure_fraction = 0.05"):
        list(stream)
    assert stream.attempted >= 100


def test_truncated_fits_files_are_named(tmp_path):
    from astropy.io import fits

    from wlshear.sim.sources import fits_problem

    path = tmp_path / "t.fits"
    fits.HDUList([fits.PrimaryHDU(), *[fits.ImageHDU(np.ones((40, 40), np.float32)) for _ in range(4)]]).writeto(path)
    assert fits_problem(path) is None
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    assert "not a whole number of 2880-byte FITS blocks" in fits_problem(path)
    path.write_bytes(data[:-2880 * 2])  # cut on a block boundary: the headers tell
    assert "truncated" in fits_problem(path) and "headers need" in fits_problem(path)
    path.write_bytes(b"\0" * 2880)
    assert "not a readable FITS file" in fits_problem(path)


def test_truncated_cosmos_catalogue_gives_a_clear_error(tmp_path, cosmos_param_dir):
    import shutil

    from wlshear.sim.sources import CosmosSource

    for f in cosmos_param_dir.glob("*.fits"):
        shutil.copy(f, tmp_path / f.name)
    cat = tmp_path / "real_galaxy_catalog_23.5_example.fits"
    cat.chmod(0o644)
    cat.write_bytes(cat.read_bytes()[:14500])
    with pytest.raises(ValueError, match=r"real_galaxy_catalog_23.5_example.fits is unusable: .*truncated.*Re-download"):
        CosmosSource(tmp_path, use_real=False, exclusion_level="none")


def test_truncated_cosmos_image_file_named_before_rendering(tmp_path, cosmos_real_dir):
    import shutil

    from wlshear.sim.sources import CosmosSource

    from wlshear.data.datasets import CachedStampSet

    name = "real_galaxy_catalog_26_extension_example.fits"
    shutil.copytree(cosmos_real_dir, tmp_path / "c")
    img = tmp_path / "c" / "real_galaxy_images_extension.fits"
    good = img.read_bytes()
    img.chmod(0o644)
    img.write_bytes(good[: len(good) // 4])
    with pytest.raises(ValueError, match=r"truncated or unreadable files \(real_galaxy_images_extension.fits: "
                       r"its headers need \d+ bytes but it has \d+ \(truncated\)\)"):
        CosmosSource(tmp_path / "c", file_name=name)
    # repaired: the same stamps as a clean run on the untouched data
    img.write_bytes(good)
    sets = [CachedStampSet(_renderer(CosmosSource(d, file_name=name, gsparams=FAST_GSPARAMS)), 12, seed=3,
                           cache_dir=tmp_path / f"cache{i}", name="val", progress=False)
            for i, d in enumerate((tmp_path / "c", cosmos_real_dir))]
    assert not sets[0].batch.failures
    np.testing.assert_array_equal(sets[0].batch.stamps, sets[1].batch.stamps)


# ------------------------------------------------------------------------------------------------
# 2. estimator input: stamps without usable signal are flagged with a reason, NaN in predict

@pytest.fixture(scope="module")
def estimator():
    import torch

    from wlshear.models import PaperCNN, ShearEstimator

    torch.manual_seed(0)
    return ShearEstimator(PaperCNN(), calibration={"m1": 0.1, "c1": 0.001})


def _noise(n, scale=1.0, seed=0):
    from wlshear.sim.noise import CorrelatedNoise

    return CorrelatedNoise(None, scale).sample(np.random.default_rng(seed), n, (32, 32)).astype(np.float32)


@pytest.mark.parametrize("case, make, reason", [
    ("physical flux units", lambda: _noise(3) * 1e-15, "scale too small: pixel std"),
    ("above 1e18", lambda: _noise(3) * 1e19, "scale too large: pixel std"),
    ("flat", lambda: np.full((3, 32, 32), 0.1, np.float32), "flat: no pixel variation"),
    ("all zero", lambda: np.zeros((3, 32, 32), np.float32), "all zero: blank or fully masked"),
    ("non-finite", lambda: np.where(np.eye(32, dtype=bool)[None], np.inf, _noise(3)), "non-finite: a NaN"),
    ("constant plus float32 rounding", lambda: (np.float32(1e6) + _noise(3) * 1e-3).astype(np.float32), "flat"),
])
def test_unusable_stamps_are_flagged_with_reason_and_nan(estimator, case, make, reason):
    x = make()
    g, failed, reasons = estimator.predict_with_flags(x, return_reasons=True)
    assert failed.all() and np.isnan(g).all(), case
    assert all(r.startswith(reason) for r in reasons), (case, reasons)
    assert np.isnan(estimator.predict(x)).all()
    # mixed with good stamps only the bad rows are flagged
    good = _noise(2, seed=5)
    g, failed = estimator.predict_with_flags(np.concatenate([good, x]))
    assert failed.tolist() == [False, False, True, True, True] and np.isfinite(g[:2]).all()


def test_legitimate_stamps_are_not_flagged(estimator):
    from wlshear.sim.augment import Augmentation
    from wlshear.sim.noise import CorrelatedNoise
    from wlshear.sim.render import StampRenderer
    from wlshear.sim.sources import ParametricSource

    pure_noise = np.concatenate([_noise(50, s, seed=i) for i, s in enumerate((1.0, 0.5, 0.25))])
    src = ParametricSource(n_galaxies=200, p_knots=0.0, seed=2)
    galaxies = [StampRenderer(src, CorrelatedNoise(None, s) if s else None, Augmentation(), gsparams=FAST_GSPARAMS)
                .simulate(64, 1).stamps for s in (0.0, 0.25, 1.0)]
    offset = galaxies[2] + np.float32(2 * 3.6e-3)  # a background offset of 2 sigma
    bright = galaxies[1] * 1e3  # a galaxy 7.5 mag brighter than the training range
    for x in (pure_noise, *galaxies, offset, bright):
        g, failed, reasons = estimator.predict_with_flags(x, return_reasons=True)
        assert not failed.any(), set(reasons)
        assert np.isfinite(g).all()


def test_pixel_units_and_range_are_documented():
    from wlshear.models import estimator, input_checks

    assert "CLASH counts" in estimator.__doc__ and "25.4193" in input_checks.__doc__
    assert input_checks.STD_MIN < 9e-5 and input_checks.STD_MAX > 1e3  # far outside the training range
    conventions = (REPO / "docs" / "CONVENTIONS.md").read_text()
    assert "input_checks" in conventions


@pytest.mark.parametrize("shape, hint", [
    ((32, 32), r"got one stamp \(32, 32\): use stamps\[None\]"),
    ((4, 1024), r"use stamps.reshape\(-1, 32, 32\)"),
    ((4, 48, 48), r"takes 32x32-pixel stamps .* got 48x48: cut 32x32 stamps centred on the galaxies"),
    ((4, 3, 32, 32), r"one channel"),
])
def test_wrong_shapes_get_the_right_hint(estimator, shape, hint):
    with pytest.raises(ValueError, match=hint):
        estimator.predict(np.ones(shape, np.float32))


def test_network_input_hint_names_the_stamp_size():
    import torch

    from wlshear.models import PaperCNN

    with pytest.raises(ValueError, match=r"takes 32x32-pixel stamps"):
        PaperCNN()(torch.zeros(2, 1, 48, 48))
    with pytest.raises(ValueError, match=r"unsqueeze\(1\)"):
        PaperCNN()(torch.zeros(2, 32, 32))


# ------------------------------------------------------------------------------------------------
# 6. estimator files

def _lightning_ckpt(path: Path) -> Path:
    import torch

    from wlshear.models import PaperCNN, net_spec

    net = PaperCNN()
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"net_spec": net_spec(net)}, "epoch": 3, "global_step": 30}, path)
    return path


def test_lightning_checkpoint_loads_with_an_uncalibrated_warning(tmp_path):
    from wlshear.models import load_estimator
    from wlshear.models.estimator import UncalibratedWarning

    with pytest.warns(UncalibratedWarning, match=r"Lightning checkpoint: the estimator has no fitted calibration"):
        est = load_estimator(_lightning_ckpt(tmp_path / "last.ckpt"))
    assert est.metadata["calibrated"] is False


def test_infer_clash_refuses_an_uncalibrated_estimator_unless_told(tmp_path):
    from wlshear.models import PaperCNN, ShearEstimator
    from wlshear.tasks import infer_clash

    ckpt = _lightning_ckpt(tmp_path / "last.ckpt")
    clusters = "clusters=[{name: a, dir: " + str(tmp_path / "nowhere") + ", redshift: 0.3}]"
    cfg = _compose("infer_clash.yaml", tmp_path, [f"estimator={ckpt}", clusters, "progress=false"])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"is a Lightning checkpoint, which has no "
                                                  r"fitted calibration.*allow_uncalibrated=true"):
        infer_clash.run(cfg)
    plain = ShearEstimator(PaperCNN(), metadata={"calibrated": False}).save(tmp_path / "estimator.pt")
    cfg = _compose("infer_clash.yaml", tmp_path, [f"estimator={plain}", clusters, "progress=false"])
    with pytest.raises(ValueError, match=r"not calibrated \(no head refit calibration"):
        infer_clash.run(cfg)
    # told: it runs (the cluster itself fails here: its directory does not exist)
    cfg = _compose("infer_clash.yaml", tmp_path, [f"estimator={ckpt}", clusters, "progress=false",
                                                  "allow_uncalibrated=true"])
    with pytest.warns(UserWarning):
        summary = infer_clash.run(cfg)
    assert summary["n_failed"] == 1 and "a" in summary["failed"]


def test_estimator_files_build_only_allowed_architectures(tmp_path, monkeypatch):
    import sys

    import torch

    from wlshear.models import PaperCNN, ShearEstimator, load_estimator, register_architecture

    # a module that records being imported: a file naming it must not get it imported
    (tmp_path / "evil_net_module.py").write_text(
        "import torch\nIMPORTED = True\nclass Net(torch.nn.Linear):\n"
        "    def __init__(self):\n        super().__init__(1, 2)\n        self.init_kwargs = {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    obj = ShearEstimator(PaperCNN()).to_dict()
    for class_path in ("evil_net_module.Net", "torch.nn.Linear", "os.system"):
        obj["net"] = {"class_path": class_path, "kwargs": {}}
        torch.save(obj, tmp_path / "e.pt")
        with pytest.raises(ValueError, match=rf"network class '{class_path}' is not an allowed architecture "
                           r"\(allowed: wlshear.models.architectures.PaperCNN"):
            load_estimator(tmp_path / "e.pt")
    assert "evil_net_module" not in sys.modules
    # a registered class of the user's own is accepted
    import evil_net_module

    register_architecture(evil_net_module.Net)
    try:
        ShearEstimator(evil_net_module.Net()).save(tmp_path / "own.pt")
        assert type(load_estimator(tmp_path / "own.pt").net).__name__ == "Net"
    finally:
        from wlshear.models.architectures import _ARCHITECTURES

        _ARCHITECTURES.pop("evil_net_module.Net", None)


def test_bad_calibration_is_reported_as_calibration_not_surface(tmp_path):
    import torch

    from wlshear.models import PaperCNN, ShearEstimator, load_estimator

    obj = ShearEstimator(PaperCNN()).to_dict()
    obj["calibration"] = {"m1": -2.0, "c1": 0.0, "m2": 0.0, "c2": 0.0}
    torch.save(obj, tmp_path / "badcal.pt")
    with pytest.raises(ValueError, match=r"badcal.pt: invalid calibration \{.*\}: calibration needs 1 \+ m > 0") as err:
        load_estimator(tmp_path / "badcal.pt")
    assert "surface" not in str(err.value)
    obj = ShearEstimator(PaperCNN()).to_dict()
    obj["surface"] = {"nonsense": 1}
    torch.save(obj, tmp_path / "badsurf.pt")
    with pytest.raises(ValueError, match=r"badsurf.pt: invalid calibration surface"):
        load_estimator(tmp_path / "badsurf.pt")


@pytest.mark.parametrize("override, message", [
    ("data.test_size=33", r"data.test_size = 33 must be even: data.test_ring = true renders 90-degree ring pairs"),
])
def test_relations_between_keys(tmp_path, override, message):
    from wlshear.tasks.train import run

    with pytest.raises(ValueError, match=message):
        run(_compose("train.yaml", tmp_path, ["debug=fast", override]))


# ------------------------------------------------------------------------------------------------
# 5. command lines (python -m wlshear.tasks.<name> key=value): arguments checked before any work

@pytest.mark.parametrize("args, message", [
    (["n=0"], r"n = 0: must be an integer in \[1, 100000000\]"),
    (["n=-5"], r"n = -5: must be an integer in \[1, 100000000\]"),
    (["n=abc"], r"n = 'abc' \(a string\): must be an integer"),
    (["out=x.txt"], r"out = 'x.txt': must be a file path ending in .npz, .fits or .fit"),
    (["data.noise_scale=-1"], r"data.noise_scale = -1: must be a number in \[0, 100\]"),
    (["population=matched"], r"population = 'matched' needs data.target_catalog"),
    (["ring=true", "n=3"], r"n = 3 must be even: ring = true renders 90-degree ring pairs"),
    (["data.noise_kernel=nope.npy"], r"data.noise_kernel = 'nope.npy': must be null or the path of an existing "
                                     r"file ending in .npy or .txt"),
    (["data.backend=cuda"], r"data.backend = 'cuda': must be one of 'galsim', 'torch'"),
    (["nokey=1"], r"Could not override 'nokey'"),
])
def test_render_cli_rejects_bad_arguments_before_rendering(tmp_path, capsys, monkeypatch, args, message):
    import re

    from wlshear.sim import render
    from wlshear.tasks.render import main

    def boom(*a, **k):  # rendering must never start
        raise AssertionError("rendered despite bad arguments")

    monkeypatch.setattr(render.StampRenderer, "simulate", boom)
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not list(tmp_path.iterdir())  # nothing written


def test_render_cli_all_failed_writes_nothing(tmp_path, monkeypatch, capsys):
    from wlshear.sim import render
    from wlshear.tasks.render import main

    empty = render.StampBatch(np.zeros((0, 32, 32), np.float32), {k: np.zeros(0) for k in render.META_KEYS},
                              [(1, "GalSimError: boom")] * 4)
    monkeypatch.setattr(render.StampRenderer, "simulate", lambda self, *a, **k: empty)
    assert main(["n=4", f"out={tmp_path / 's.npz'}"]) == 1
    assert "all 4 stamps failed to render (nothing written)" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()


def test_simulate_checks_n_and_empty_batches_save():
    from wlshear.sim.render import StampBatch, StampRenderer
    from wlshear.sim.sources import ParametricSource

    r = StampRenderer(ParametricSource(n_galaxies=10, p_knots=0.0), gsparams=FAST_GSPARAMS)
    with pytest.raises(ValueError, match=r"n must be an integer >= 0, got -5"):
        r.simulate(-5, 0)
    b = r.simulate(0, 0)
    assert len(b) == 0 and "g1" in b.meta and b.shear.shape == (0, 2)


@pytest.mark.parametrize("module, args, message", [
    ("wlshear.tasks.mock_field", ["out=o", "mock.size=10"], r"mock.size = 10: must be an integer in \[64, 100000\]"),
    ("wlshear.tasks.mock_field", ["out=o", "data.noise_scale=0"], r"data.noise_scale = 0: must be a number in \(0, 100\]"),
    ("wlshear.tasks.mock_field", ["out=o", "mock.z_source=0.2"], r"mock.z_source = 0.2 must be beyond mock.z_lens = 0.3"),
    ("wlshear.tasks.mock_field", ["out=o", "mock.center=[1,2,3]"], r"mock.center = \[1, 2, 3\]: must be null or a list of 2"),
    ("wlshear.tasks.mock_field", [], r"required but unset: out"),
    ("wlshear.tasks.noise_kernel", ["image=a.fits", "out=k.npy"], r"image = 'a.fits': must be the path of an existing"),
    ("wlshear.tasks.noise_kernel", ["image=b.fits", "out=k.npy", "size=6"], r"size = 6 must be odd"),
    ("wlshear.tasks.summarize", [], r"required but unset: dir"),
])
def test_other_clis_check_their_numbers(tmp_path, capsys, monkeypatch, module, args, message):
    import importlib
    import re

    from astropy.io import fits

    monkeypatch.chdir(tmp_path)
    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(tmp_path / "b.fits")
    assert importlib.import_module(module).main(args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["b.fits"]  # nothing written


def test_fit_surface_checks_its_data_config_first(tmp_path, monkeypatch, capsys):
    import re

    from wlshear.tasks.fit_surface import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "e.pt").write_bytes(b"")
    assert main(["estimator=missing.pt", "out=o.pt", "data.noise_scale=-1"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"data.noise_scale = -1: must be a number in \[0, 100\]", err)
    assert re.search(r"estimator = 'missing.pt': must be the path of an existing file ending in .pt or .ckpt", err)
    assert main(["estimator=e.pt", "out=o.pt", "surface.n=41"]) == 2
    assert "surface.n = 41 must be even" in capsys.readouterr().err
