"""Training stamps drawn on the training device (``data.render_on_device: true``, torch backend).

The DataLoader workers only sample each batch's stamp parameters and make the torch renderer's
plan (:func:`wlshear.sim.torch_render.plan_batch`: prepared galaxies, output periods, centroid
phases and knot profiles, a few hundred kB per batch of 100 stamps). Lightning moves the plan to
the training device with the batch, and :meth:`ShearDataModule.on_after_batch_transfer` draws it
there (:func:`draw_on_device`): the k-space evaluation and inverse FFTs
(:func:`~wlshear.sim.torch_render.execute_plan`), the source's mask and flux factor, and the
correlated background noise (white noise convolved with the noise kernel, drawn by a device
generator seeded from the batch). A GPU is then fed by the CPU work of planning only; on a CPU
trainer the same code runs in the main process.

The stamps follow the same distribution as the host-rendered stream, and their noiseless part is
the same function of the parameters (``tests/test_device_render.py``); the noise fields differ
(a torch generator instead of numpy's), so the two streams are not stamp-for-stamp equal.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from wlshear.data.datasets import ShearStream
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.render import StampRenderer
from wlshear.sim.torch_render import execute_plan, plan_batch, plan_tensors

__all__ = ["PlanStream", "draw_on_device", "device_noise", "is_plan_batch"]

log = logging.getLogger(__name__)


class PlanStream(ShearStream):
    """The training stream as batch plans: each item is one batch of ``batch_size`` stamps
    (use a DataLoader with ``batch_size=None``), a dict ``{"plan": plan tensors, "g": (n, 2)
    float32 true shear, "noise_seed": int64 scalar tensor}`` for :func:`draw_on_device`.

    Batches per epoch and rank: ceil(samples_per_epoch / world_size / batch_size); worker ``w`` of
    ``W`` makes batches w, w + W, ... A galaxy that cannot be prepared is left out of its batch
    and counted against ``max_failure_fraction`` here; stamps with non-finite pixels after drawing
    are dropped (and logged) on the device.
    """

    def __init__(self, renderer: StampRenderer, samples_per_epoch: int, batch_size: int, seed: int = 0,
                 max_failure_fraction: float = 0.05):
        if renderer.backend != "torch":
            raise ValueError(f"render_on_device needs the torch renderer backend, not {renderer.backend!r} "
                             "(set data.backend=torch)")
        super().__init__(renderer, samples_per_epoch, seed=seed, chunk=batch_size,
                         max_failure_fraction=max_failure_fraction)
        self.batch_size = int(batch_size)

    def _samples_per_rank(self) -> int:
        return math.ceil(self.samples_per_epoch / self.world_size)

    def __len__(self) -> int:  # batches per rank
        return math.ceil(self._samples_per_rank() / self.batch_size)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        ss = np.random.SeedSequence(self.worker_seed(wid, self._pass_epoch()))
        p_rng, n_rng = (np.random.default_rng(s) for s in ss.spawn(2))
        self.failure_count = self.attempted = 0
        self.first_failures = []
        per_rank = self._samples_per_rank()
        for b in range(wid, len(self), nw):
            m = min(self.batch_size, per_rank - b * self.batch_size)
            params = self.renderer.sample_params(p_rng, m)
            plan = plan_batch(self.renderer, params, self.renderer.stamp_size)
            self._count_plan_failures(plan, params, m, wid)
            g = np.stack([params.g1, params.g2], 1).astype(np.float32)
            yield {"plan": plan_tensors(plan), "g": torch.from_numpy(g),
                   "noise_seed": torch.tensor(int(n_rng.integers(2**62)), dtype=torch.int64)}

    def _count_plan_failures(self, plan: dict, params, m: int, wid: int) -> None:
        fails = [(int(params.galaxy_id[i]), msg) for i, msg in plan["failures"]]
        for gid, msg in fails:
            log.warning("skipped galaxy %d: %s", gid, msg)
        self._count_failures(SimpleNamespace(failures=fails), m, wid)


def is_plan_batch(batch) -> bool:
    """True for a :class:`PlanStream` item."""
    return isinstance(batch, dict) and "plan" in batch and "noise_seed" in batch


_KERNELS: dict = {}


def device_noise(noise: CorrelatedNoise, n: int, shape, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """``n`` correlated noise fields (ny, nx) [counts] drawn on ``device``: white noise of unit
    variance convolved with ``noise.kernel`` (a true convolution, as ``CorrelatedNoise.sample``),
    from a torch generator seeded with ``seed``."""
    ny, nx = shape
    if noise.scale == 0:
        return torch.zeros((n, ny, nx), dtype=dtype, device=device)
    key = (id(noise), float(noise.scale), str(device), dtype)
    if key not in _KERNELS:
        k = np.ascontiguousarray(noise.kernel[::-1, ::-1])  # conv2d correlates: flip for a convolution
        _KERNELS[key] = torch.as_tensor(k, dtype=dtype, device=device)[None, None]
    ker = _KERNELS[key]
    ky, kx = ker.shape[-2:]
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    white = torch.randn((n, 1, ny + ky - 1, nx + kx - 1), generator=gen, device=device, dtype=dtype)
    return F.conv2d(white, ker)[:, 0]


def draw_on_device(renderer: StampRenderer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Stamps ``(x (n, S, S) float32 counts, g (n, 2))`` of a :class:`PlanStream` batch, drawn on
    the device its tensors are on: noiseless images (``execute_plan``), the source's image-stage
    mask and flux factor (as ``StampRenderer.postprocess``), then noise. Rows that failed are
    dropped and logged."""
    g = batch["g"]
    device = g.device
    img = execute_plan(renderer, batch["plan"], device)
    thr = renderer.source.image_mask_threshold
    if thr is not None:
        img = torch.where(img < thr, torch.zeros_like(img), img)
    img = img * float(renderer.source.flux_factor)
    keep = torch.isfinite(img).flatten(1).all(1)
    n_bad = int((~keep).sum())
    if n_bad:
        log.warning("%d of %d device-drawn stamp(s) were dropped: galaxies that could not be prepared (logged "
                    "and counted by the stream) or non-finite pixels", n_bad, len(keep))
    x = img.to(torch.float32)
    if renderer.noise is not None:
        x = x + device_noise(renderer.noise, x.shape[0], x.shape[1:], int(batch["noise_seed"]), device)
    if n_bad:
        x, g = x[keep], g[keep]
    return x, g
