"""LightningDataModule: on-the-fly training stream plus cached validation/test/refit sets."""

from __future__ import annotations

import logging

import lightning as L
from torch.utils.data import DataLoader

from wlshear.data.datasets import CachedStampSet, EpochLoader, GroupedShearStream, ShearStream
from wlshear.data.device_render import PlanStream, draw_on_device, is_plan_batch
from wlshear.data.rules import DATA_RULES
from wlshear.sim.augment import Augmentation
from wlshear.sim.constants import PIXEL_SCALE, PSF_FWHM, STAMP_SIZE
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.population import split_galaxies
from wlshear.sim.render import StampRenderer
from wlshear.sim.sources import GalaxySource
from wlshear.utils.plain import to_plain
from wlshear.utils.validate import validate_values

log = logging.getLogger(__name__)


def _plain(obj):
    """OmegaConf containers -> plain dict/list; other objects (e.g. a source) kept as they are."""
    return to_plain(obj, unknown=lambda o: o)


class ShearDataModule(L.LightningDataModule):
    """Stamps for training (rendered on the fly) and fixed evaluation sets (cached on disk).

    Parameters
    ----------
    source : GalaxySource (built by Hydra from ``conf/data/source/*.yaml``)
    noise_scale : multiplies the noise kernel (1, 0.5, 0.25 = the paper's three levels; 0 = none)
    noise_kernel : path of a kernel file or None for the embedded CLASH kernel
    augment : dict of ``Augmentation`` fields for training; evaluation sets use its test mode
        (rotation + mirror only)
    train_population / eval_population : 'natural', 'homogenised' or 'matched'
    mag_bins : source-magnitude bins for 'homogenised'
    target_catalog : (mag, hlr_px) table for 'matched'
    samples_per_epoch : training stamps per epoch (across all ranks)
    val_size / test_size / refit_size : sizes of the cached sets; ``test_ring`` renders the test
        set as shape-noise-cancelling 90-degree ring pairs
    cache_dir : where cached sets live (None = keep in memory only)
    backend : renderer backend ('galsim' or 'torch')
    render_margin : extra pixels rendered on each side of every stamp (stamps are
        ``stamp_size + 2 render_margin``): the input margin of the metacal operator, which maps them
        to ``stamp_size`` counterfactuals (``metacal.margin``; 0 without metacal)
    max_failure_fraction : a cached set with more failed stamps than this fraction raises
        ``RenderFailureError`` and is not cached (default 1%)
    stream_max_failure_fraction : the training stream stops with ``RenderFailureError`` when its
        running failure fraction passes this (default 5%, judged after 100 stamps per worker)
    split : galaxy-disjoint split, ``{"enabled", "test_fraction", "seed"}`` (default on, 15%, seed 0;
        ``wlshear.sim.population.split_galaxies``): the training stream, validation and refit sets
        draw only training-side galaxy ids (``train_renderer``, ``fit_renderer``), the test sets
        only test-side ids (``eval_renderer``); ``split_ids()`` gives both. ``enabled: false``:
        every set draws from every galaxy
    render_on_device : draw the training stamps on the training device (torch backend only):
        workers send batch plans, ``on_after_batch_transfer`` draws them where the batch landed
        (``wlshear.data.device_render``); validation, test and refit sets stay cached
    """

    def __init__(
        self,
        source: GalaxySource,
        noise_scale: float = 1.0,
        noise_kernel=None,
        augment: dict | None = None,
        train_population: str = "homogenised",
        eval_population: str = "natural",
        mag_bins=None,
        target_catalog=None,
        psf_fwhm: float = PSF_FWHM,
        pixel_scale: float = PIXEL_SCALE,
        stamp_size: int = STAMP_SIZE,
        gsparams: dict | None = None,
        backend: str = "galsim",
        samples_per_epoch: int = 20000,
        val_size: int = 2000,
        test_size: int = 4000,
        refit_size: int | str = 300000,
        test_ring: bool = False,
        batch_size: int = 100,
        eval_batch_size: int = 1000,
        num_workers: int = 1,
        seed: int = 0,
        cache_dir: str | None = None,
        chunk: int = 64,
        max_failure_fraction: float = 0.01,
        stream_max_failure_fraction: float = 0.05,
        render_margin: int = 0,
        render_on_device: bool = False,
        split: dict | None = None,
    ):
        super().__init__()
        validate_values(
            dict(noise_scale=noise_scale, augment=_plain(augment) or {}, train_population=train_population,
                 eval_population=eval_population, psf_fwhm=psf_fwhm, pixel_scale=pixel_scale, stamp_size=stamp_size,
                 backend=backend, samples_per_epoch=samples_per_epoch, val_size=val_size, test_size=test_size,
                 refit_size=refit_size, test_ring=test_ring, batch_size=batch_size, eval_batch_size=eval_batch_size,
                 num_workers=num_workers, seed=seed, chunk=chunk, max_failure_fraction=max_failure_fraction,
                 stream_max_failure_fraction=stream_max_failure_fraction, render_margin=render_margin,
                 render_on_device=render_on_device, split=_plain(split) or {}),
            DATA_RULES, prefix="data.", what="data value")
        # plain containers only, so checkpoints load with torch.load(weights_only=True)
        augment, mag_bins, gsparams, split = _plain(augment), _plain(mag_bins), _plain(gsparams), _plain(split)
        noise_kernel = None if noise_kernel is None else str(noise_kernel)
        target_catalog = None if target_catalog is None else str(target_catalog)
        if render_on_device and backend != "torch":
            raise ValueError(f"data.render_on_device=true draws stamps with the torch renderer on the training device; "
                             f"data.backend is {backend!r} (set data.backend=torch)")
        self.save_hyperparameters(ignore=["source"], logger=False)
        self.source = source
        self.noise = CorrelatedNoise(noise_kernel, noise_scale) if noise_scale > 0 else None
        aug = Augmentation(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(augment or {}).items()})
        common = dict(psf_fwhm=psf_fwhm, pixel_scale=pixel_scale, stamp_size=stamp_size + 2 * int(render_margin),
                      gsparams=gsparams, backend=backend, mag_bins=mag_bins, target_catalog=target_catalog)
        split = {"enabled": True, "test_fraction": 0.15, "seed": 0, **dict(split or {})}
        self.split_config = split
        self._split = None
        if split["enabled"]:
            self._split = split_galaxies(len(source), float(split["test_fraction"]), int(split["seed"]))
        train_ids, test_ids = self._split if self._split is not None else (None, None)
        self.train_renderer = StampRenderer(source, self.noise, aug, population=train_population,
                                            galaxy_ids=train_ids, **common)
        # validation and refit sets: training-side galaxies, evaluation augmentation and population
        self.fit_renderer = StampRenderer(source, self.noise, aug.test_mode(), population=eval_population,
                                          galaxy_ids=train_ids, **common)
        self.eval_renderer = StampRenderer(source, self.noise, aug.test_mode(), population=eval_population,
                                           galaxy_ids=test_ids, **common)
        self.cache_dir = cache_dir
        self.train_set: ShearStream | None = None
        self.val_set = self.test_set = None
        self._train_passes = 0

    # -- sets ------------------------------------------------------------------------------
    def split_ids(self) -> dict | None:
        """``{"train": ids, "test": ids}`` of the galaxy-disjoint split (None when disabled)."""
        if self._split is None:
            return None
        return {"train": self._split[0], "test": self._split[1]}

    def _cached(self, renderer: StampRenderer, name: str, n: int, seed_offset: int, ring: bool = False) -> CachedStampSet:
        return CachedStampSet(renderer, n, self.hparams.seed * 1000 + seed_offset,
                              cache_dir=self.cache_dir, ring=ring, name=name,
                              workers=self.hparams.num_workers,
                              max_failure_fraction=self.hparams.max_failure_fraction)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and self.train_set is None and hp.get("render_on_device"):
            self.train_set = PlanStream(self.train_renderer, hp.samples_per_epoch, hp.batch_size, seed=hp.seed,
                                        max_failure_fraction=hp.stream_max_failure_fraction)
        elif stage in (None, "fit") and self.train_set is None:
            self.train_set = ShearStream(self.train_renderer, hp.samples_per_epoch, seed=hp.seed, chunk=hp.chunk,
                                         max_failure_fraction=hp.stream_max_failure_fraction)
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._cached(self.fit_renderer, "val", hp.val_size, 1)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._cached(self.eval_renderer, "test", hp.test_size, 2, ring=hp.test_ring)

    def refit_set(self, n: int | None = None, ring: bool = False) -> CachedStampSet:
        """Un-augmented (rotation + mirror), population-weighted stamps for the head refit
        (``ring``: in 90-degree ring pairs, so the calibration fitted on them cancels shape noise).

        ``n`` defaults to ``refit_size``; with ``refit_size="auto"`` (the size follows the network, see
        ``wlshear.models.refit.refit_sample_size``) pass ``n`` explicitly.
        """
        n = n or self.hparams.refit_size
        if isinstance(n, str):
            raise ValueError(f"refit_size={n!r}: pass the number of stamps, e.g. "
                             "refit_set(refit_sample_size(net, 'auto'))")
        return self._cached(self.fit_renderer, "refit", int(n), 3, ring=ring)

    # -- loaders ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if isinstance(self.train_set, PlanStream):  # items are whole batch plans
            return EpochLoader(self.train_set, start_epoch=self._train_passes, batch_size=None,
                               num_workers=hp.num_workers)
        return EpochLoader(self.train_set, start_epoch=self._train_passes, batch_size=hp.batch_size,
                           num_workers=hp.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Draw a device-rendered training batch (a plan) where it landed; other batches pass."""
        if is_plan_batch(batch):
            return draw_on_device(self.train_renderer, batch)
        return batch

    def _eval_loader(self, ds) -> DataLoader:
        return DataLoader(ds, batch_size=self.hparams.eval_batch_size, shuffle=False, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    # -- checkpointing: resume continues the stream instead of repeating epoch 0 -------------
    def state_dict(self):
        passes = self.trainer.current_epoch + 1 if self.trainer is not None else self._train_passes
        return {"train_passes": int(passes)}

    def load_state_dict(self, state):
        self._train_passes = int(state.get("train_passes", 0))


class GroupedShearDataModule(ShearDataModule):
    """``ShearDataModule`` whose training stream yields groups of ``group_size`` stamps of one galaxy
    with different shears (:class:`~wlshear.data.datasets.GroupedShearStream`), for objectives that
    penalise each galaxy's shear response. ``batch_size`` counts stamps: a batch holds
    ``batch_size // group_size`` groups. ``same_noise``: members of a group share one noise
    realisation. Validation, test and refit sets are unchanged.
    """

    def __init__(self, *args, group_size: int = 8, same_noise: bool = True, **kwargs):
        # plain containers: Lightning also records this frame's kwargs in the hparams (checkpoints
        # must load with torch.load(weights_only=True))
        kwargs = {k: _plain(v) for k, v in kwargs.items()}
        if kwargs.get("render_on_device"):
            raise ValueError("data.render_on_device is not available for the grouped stream (data=grouped): its "
                             "groups share noise fields drawn on the host; use data=default")
        super().__init__(*args, **kwargs)
        if group_size < 2:
            raise ValueError(f"data.group_size must be >= 2, got {group_size}")
        self.group_size = int(group_size)
        self.same_noise = bool(same_noise)
        self.hparams["group_size"] = self.group_size
        self.hparams["same_noise"] = self.same_noise

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = GroupedShearStream(self.train_renderer, hp.samples_per_epoch, group_size=self.group_size,
                                                seed=hp.seed, chunk=hp.chunk, same_noise=self.same_noise,
                                                max_failure_fraction=hp.stream_max_failure_fraction)
        super().setup(stage)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return EpochLoader(self.train_set, start_epoch=self._train_passes,
                           batch_size=max(1, hp.batch_size // self.group_size), num_workers=hp.num_workers)
