"""On-the-fly training stream and cached evaluation sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wlshear.data import ShearDataModule
from wlshear.data.datasets import CachedStampSet, EpochLoader, ShearStream
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.render import StampRenderer
from wlshear.sim.sources import ParametricSource

from conftest import FAST_GSPARAMS


@pytest.fixture(scope="module")
def renderer():
    src = ParametricSource(n_galaxies=200, p_knots=0.0, seed=0)
    return StampRenderer(src, noise=CorrelatedNoise(), gsparams=FAST_GSPARAMS)


def _collect(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def test_workers_draw_distinct_stamps_and_runs_reproduce(renderer):
    ds = ShearStream(renderer, samples_per_epoch=48, seed=3, chunk=8)
    loader = EpochLoader(ds, batch_size=8, num_workers=2)
    x1, y1 = _collect(loader)  # epoch 0
    x2, _ = _collect(loader)  # epoch 1
    assert len(x1) == 48
    # no duplicates across workers: every stamp unique (noise alone makes collisions impossible)
    flat = x1.reshape(len(x1), -1).numpy()
    assert len({row.tobytes() for row in flat}) == 48
    # epochs differ
    assert not torch.allclose(x1, x2)
    # same seed and worker count reproduce the same stamps
    again = EpochLoader(ShearStream(renderer, samples_per_epoch=48, seed=3, chunk=8), batch_size=8, num_workers=2)
    x3, y3 = _collect(again)
    torch.testing.assert_close(x1, x3)
    torch.testing.assert_close(y1, y3)


def test_persistent_workers_draw_the_stamps_of_fresh_workers(renderer):
    """Persistent workers (the default) count their own passes: epochs 0-2, resumed from epoch 1
    too, equal what workers pickled afresh every epoch draw."""
    def epochs(persistent, start=0, n=3):
        loader = EpochLoader(ShearStream(renderer, samples_per_epoch=24, seed=5, chunk=8), start_epoch=start,
                             batch_size=8, num_workers=2, persistent_workers=persistent)
        assert loader.persistent_workers is (persistent is not False)
        return [_collect(loader)[0] for _ in range(n)]

    fresh, kept = epochs(False), epochs(None)
    for a, b in zip(fresh, kept):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(kept[0], kept[1]) and not torch.allclose(kept[1], kept[2])
    resumed = epochs(None, start=1, n=2)
    torch.testing.assert_close(resumed[0], fresh[1])
    torch.testing.assert_close(resumed[1], fresh[2])


def test_worker_seeds_include_rank_and_epoch(renderer):
    ds = ShearStream(renderer, samples_per_epoch=10, seed=1)
    seeds = set()
    for epoch in range(2):
        for rank in range(2):
            for wid in range(2):
                ds.set_epoch(epoch)
                ds.rank = rank
                seeds.add(tuple(ds.worker_seed(wid)))
    assert len(seeds) == 8


def test_rank_share_of_epoch(renderer):
    ds = ShearStream(renderer, samples_per_epoch=101, seed=1)
    ds.world_size = 2
    assert len(ds) == 51
    assert ds._share(0, 2) + ds._share(1, 2) == 51


def test_cached_set_is_reused_and_keyed_by_config(tmp_path, renderer):
    a = CachedStampSet(renderer, 12, seed=4, cache_dir=tmp_path, name="val", progress=False)
    files = list(tmp_path.glob("val_*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = CachedStampSet(renderer, 12, seed=4, cache_dir=tmp_path, name="val", progress=False)
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not re-rendered
    torch.testing.assert_close(a.stamps, b.stamps)
    half = StampRenderer(renderer.source, noise=CorrelatedNoise(None, 0.5), gsparams=FAST_GSPARAMS)
    CachedStampSet(half, 12, seed=4, cache_dir=tmp_path, name="val", progress=False)
    assert len(list(tmp_path.glob("val_*.npz"))) == 2  # another noise level, another cache
    files[0].write_bytes(b"corrupt")
    c = CachedStampSet(renderer, 12, seed=4, cache_dir=tmp_path, name="val", progress=False)
    torch.testing.assert_close(a.stamps, c.stamps)  # corrupt cache re-rendered
    x, y = a[0]
    assert x.shape == (32, 32) and y.shape == (2,)
    assert set(a.meta) >= {"g1", "g2", "galaxy_id", "mag", "hlr_px", "snr", "dx", "dy", "rotation", "mirror", "mu"}


def test_datamodule_sets_and_test_mode(tmp_path):
    src = ParametricSource(n_galaxies=100, p_knots=0.0, seed=0)
    dm = ShearDataModule(src, samples_per_epoch=16, val_size=8, test_size=8, batch_size=4, num_workers=0,
                         cache_dir=str(tmp_path), gsparams=FAST_GSPARAMS,
                         mag_bins=[[22, 24], [24, 25.5], [25.5, 27]])
    dm.setup("fit")
    dm.setup("test")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 32, 32) and y.shape == (4, 2)
    assert np.all(dm.test_set.meta["dx"] == 0) and np.all(dm.test_set.meta["mu"] == 1)
    assert dm.train_renderer.augment.shift == 3.5
    refit = dm.refit_set(6)
    assert len(refit) == 6 and np.all(refit.meta["dx"] == 0)


@pytest.mark.parametrize("backend", ["galsim", "torch"])
def test_galaxy_disjoint_split_keeps_test_galaxies_out_of_training(tmp_path, backend):
    """data.split (default on): training stream, validation and refit sets draw training-side ids
    only, the test set test-side ids only, for both backends and when read back from the cache."""
    src = ParametricSource(n_galaxies=60, p_knots=0.0, seed=0)
    kw = dict(noise_scale=1.0, backend=backend, train_population="natural", samples_per_epoch=40, batch_size=20,
              num_workers=0, val_size=30, test_size=30, refit_size=30, test_ring=True, cache_dir=str(tmp_path))
    dm = ShearDataModule(src, **kw)
    ids = dm.split_ids()
    train, test = set(ids["train"].tolist()), set(ids["test"].tolist())
    assert len(test) == 9 and len(train) == 51 and not train & test
    stream = ShearStream(dm.train_renderer, samples_per_epoch=200, seed=1, chunk=50, return_meta=True)
    seen = {int(meta["galaxy_id"]) for _, _, meta in stream}
    assert seen <= train and len(seen) > 20
    dm.setup()
    for ds in (dm.val_set, dm.refit_set(30)):
        assert set(ds.meta["galaxy_id"].tolist()) <= train
    assert set(dm.test_set.meta["galaxy_id"].tolist()) <= test
    # read back from the cache: the same sides
    again = ShearDataModule(src, **kw)
    again.setup("test")
    assert again.test_set.path == dm.test_set.path and set(again.test_set.meta["galaxy_id"].tolist()) <= test
    # the split is fixed by its seed; without it every set draws from every galaxy (another cache)
    assert np.array_equal(ShearDataModule(src, **kw).split_ids()["test"], ids["test"])
    shared = ShearDataModule(src, **{**kw, "split": {"enabled": False}})
    assert shared.split_ids() is None and np.all(shared.eval_renderer.weights > 0)
    shared.setup("test")
    assert shared.test_set.path != dm.test_set.path
