"""Training stamps drawn on the training device (data.render_on_device), run here on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from wlshear.data import ShearDataModule
from wlshear.data.datamodule import GroupedShearDataModule
from wlshear.data.datasets import ShearStream
from wlshear.data.device_render import PlanStream, device_noise, draw_on_device, is_plan_batch
from wlshear.sim import torch_render
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.render import StampRenderer
from wlshear.sim.sources import ParametricSource
from wlshear.sim.torch_render import TorchRenderSettings, draw_batch, execute_plan, plan_batch, plan_tensors

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _source(**kw):
    return ParametricSource(n_galaxies=40, seed=3, hlr_range_px=(1.0, 6.0), **kw)


@pytest.mark.parametrize("analytic", [True, False])
def test_plan_drawn_in_another_process_order_gives_the_same_stamps(analytic):
    """A plan names its radial tables by key: drawn where the tables were built in another order
    (as in the main process after a DataLoader worker made the plan), the stamps are unchanged.
    Knots (analytic path) and k-grid galaxies (generic path) both travel in the plan."""
    settings = TorchRenderSettings()
    settings.analytic = analytic
    r = StampRenderer(_source(p_knots=1.0), noise=None, backend="torch")
    p = r.sample_params(np.random.default_rng(4), 12)
    ref, fails = draw_batch(r, p, r.stamp_size, settings=settings)
    assert fails == [] and np.all(np.isfinite(ref)) and ref.max() > 0
    plan = plan_tensors(plan_batch(r, p, r.stamp_size, settings))
    if analytic:
        assert len(plan["knots"]["row"]) > 0 and len(plan["table_keys"]) > 0 and not len(plan["generic_rows"])
    else:
        assert len(plan["generic_rows"]) == 12 and not plan["groups"]
    torch_render.clear_caches(tables=True)
    torch_render._radial_table_id("gauss", None, None, settings)  # a different first table
    out = execute_plan(r, plan, "cpu", settings)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-6 * ref.max())


def test_device_stream_draws_what_the_host_stream_draws():
    """Noiseless, the device-drawn stream equals the host stream with the same seed and chunk:
    same parameters, same images (the device path adds only where the drawing happens)."""
    src = _source(p_knots=0.5)
    dm = ShearDataModule(src, noise_scale=0.0, backend="torch", render_on_device=True,
                         train_population="natural", samples_per_epoch=20, batch_size=8, num_workers=0, seed=2)
    dm.setup("fit")
    assert isinstance(dm.train_set, PlanStream)
    loader = dm.train_dataloader()
    items = list(loader)
    assert len(items) == len(loader) == 3 and all(is_plan_batch(b) for b in items)
    drawn = [dm.on_after_batch_transfer(b, 0) for b in items]
    assert [x.shape[0] for x, _ in drawn] == [8, 8, 4]
    x_dev = torch.cat([x for x, _ in drawn])
    g_dev = torch.cat([g for _, g in drawn])
    assert x_dev.dtype == torch.float32 and x_dev.shape == (20, 32, 32)
    host = ShearStream(dm.train_renderer, samples_per_epoch=20, seed=2, chunk=8)
    xs, gs = zip(*list(host))
    torch.testing.assert_close(g_dev, torch.stack(gs))
    x_host = torch.stack(xs)
    torch.testing.assert_close(x_dev, x_host, rtol=0, atol=1e-6 * float(x_host.abs().max()))
    # a non-plan batch (validation) passes through the hook unchanged
    val = (x_host[:2], g_dev[:2])
    assert dm.on_after_batch_transfer(val, 0) is val


def test_device_noise_has_the_kernel_covariance():
    noise = CorrelatedNoise(scale=1.0)
    f = device_noise(noise, 3000, (24, 24), seed=11, device="cpu").double().numpy()
    cov = noise.covariance(max_lag=2)
    c = cov.shape[0] // 2
    for dy, dx in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]:
        emp = np.mean(f[:, 2:22, 2:22] * f[:, 2 + dy:22 + dy, 2 + dx:22 + dx])
        assert emp == pytest.approx(cov[c + dy, c + dx], rel=0.03, abs=0.01 * cov[c, c]), (dy, dx)
    again = device_noise(noise, 3000, (24, 24), seed=11, device="cpu").double().numpy()
    np.testing.assert_array_equal(f, again)
    assert not np.allclose(f, device_noise(noise, 3000, (24, 24), seed=12, device="cpu").numpy())


def test_device_batch_adds_noise_of_the_configured_level():
    src = _source(p_knots=0.0)
    dm = ShearDataModule(src, noise_scale=1.0, backend="torch", render_on_device=True,
                         train_population="natural", samples_per_epoch=64, batch_size=64, num_workers=0, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x, g = draw_on_device(dm.train_renderer, batch)
    clean = execute_plan(dm.train_renderer, batch["plan"]) * src.flux_factor
    resid = (x.double() - clean).numpy()
    assert resid.std() == pytest.approx(dm.noise.sigma, rel=0.05)
    assert g.shape == (64, 2) and float(g.abs().max()) <= 0.2


def test_render_on_device_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError, match="data.backend=torch"):
        ShearDataModule(_source(), backend="galsim", render_on_device=True)
    with pytest.raises(ValueError, match="grouped"):
        GroupedShearDataModule(_source(), backend="torch", render_on_device=True)
    with pytest.raises(ValueError, match="torch renderer backend"):
        PlanStream(StampRenderer(_source(), noise=None), 10, 5)


def test_train_runs_with_stamps_drawn_on_the_device(tmp_path):
    """train.py with data.render_on_device=true (CPU trainer, a DataLoader worker making plans)."""
    from wlshear.tasks.train import run

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train.yaml", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
            "debug=fast", "data.backend=torch", "data.render_on_device=true", "data.num_workers=1",
            "data.samples_per_epoch=64", "data.batch_size=16", "trainer.max_epochs=2",
            "refit.enabled=false", "evaluate.enabled=false"])
    metrics = run(cfg)
    assert np.isfinite(metrics["val_mse"])
    assert (tmp_path / "run" / "estimator.pt").is_file()
