"""Data parallelism on CPU: ranks render disjoint training stamps, and train.py with two gloo
processes (trainer=ddp_cpu) completes, gathers validation metrics and writes metrics.json once."""

from __future__ import annotations

import csv
import json
from itertools import islice

import numpy as np
import pytest

from test_sweeps import TINY, run_train


def test_stream_seed_depends_on_rank_and_worker():
    from wlshear.data.datasets import ShearStream

    s = ShearStream(renderer=None, samples_per_epoch=10, seed=7)
    seeds = set()
    for rank in (0, 1):
        for worker in (0, 1):
            s.rank = rank
            seeds.add(tuple(s.worker_seed(worker)))
    assert len(seeds) == 4
    s.world_size = 2
    assert len(s) == 5  # samples_per_epoch is split across ranks


def test_ranks_render_disjoint_stamps():
    from omegaconf import OmegaConf
    from hydra.utils import instantiate

    from conftest import REPO
    from wlshear.data.datasets import ShearStream
    from wlshear.utils.callbacks import stamp_hash

    src = OmegaConf.load(REPO / "conf/data/source/parametric.yaml").source
    src.n_galaxies, src.p_knots = 50, 0.0
    from wlshear.data import ShearDataModule

    dm = ShearDataModule(instantiate(src), noise_scale=1.0, train_population="natural",
                         augment={"shift": 3.5}, samples_per_epoch=8, num_workers=0, chunk=4, seed=3)
    hashes = []
    for rank in (0, 1):
        st = ShearStream(dm.train_renderer, 8, seed=3, chunk=4)
        st.rank, st.world_size = rank, 2
        hashes.append({stamp_hash(x.numpy()) for x, _ in islice(iter(st), 4)})
    assert len(hashes[0]) == len(hashes[1]) == 4 and not hashes[0] & hashes[1]


@pytest.mark.slow
def test_train_py_ddp_two_cpu_processes(tmp_path):
    run = tmp_path / "ddp"
    run_train([*TINY, "trainer=ddp_cpu", "refit.enabled=false", "data.samples_per_epoch=64",
               "+callbacks.stamp_hashes._target_=wlshear.utils.callbacks.StampHashRecorder",
               "+callbacks.stamp_hashes.out_dir=${paths.output_dir}", f"hydra.run.dir={run}"], tmp_path)
    r0 = [ln.split()[1] for ln in (run / "stamp_hashes" / "rank0.txt").read_text().split("\n") if ln]
    r1 = [ln.split()[1] for ln in (run / "stamp_hashes" / "rank1.txt").read_text().split("\n") if ln]
    assert len(r0) == len(r1) == 32  # 64 stamps per epoch split over 2 ranks
    assert not set(r0) & set(r1)
    assert len(list(tmp_path.rglob("metrics.json"))) == 1
    m = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(m["val_mse"]) and "summary" in m
    rows = list(csv.DictReader(open(next((run / "csv").rglob("metrics.csv")))))
    assert any(r.get("val/m1") for r in rows)  # bias fit over the gathered validation predictions
