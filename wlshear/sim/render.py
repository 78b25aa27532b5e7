"""The stamp renderer: one interface for training, evaluation and mock cluster fields.

``StampRenderer`` turns ``StampParams`` into noisy stamps in four steps that every backend
shares:

1. the backend draws the noiseless, lensed, PSF-convolved galaxy on the stamp grid
   (``backend='galsim'``: GalSim; faster backends plug in through ``register_backend``);
2. pixels below the source's ``mask_threshold`` are set to 0 (COSMOS native noise; unless the
   source masks the unlensed galaxy itself, ``mask_stage="source"``);
3. the stamp is multiplied by the source's ``flux_factor`` (now CLASH counts);
4. correlated background noise is added (``CorrelatedNoise``).

A stamp that fails to render (GalSim error, non-finite pixels) is skipped and recorded in
``StampBatch.failures``; it never aborts a batch.

Command line (composes ``conf/render.yaml``): ``python -m wlshear.tasks.render n=1000 out=stamps.fits``
renders stamps to an npz or FITS file and writes a PNG grid of normalised stamps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import galsim
import numpy as np

from wlshear.sim.augment import Augmentation, StampParams, sample_params
from wlshear.sim.constants import PIXEL_SCALE, PSF_FWHM, STAMP_SIZE
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.population import population_weights
from wlshear.sim.psf import make_psf
from wlshear.sim.sources import GalaxySource, make_gsparams

log = logging.getLogger(__name__)

#: file types StampBatch.save writes
STAMP_SUFFIXES = (".npz", ".fits", ".fit")

META_KEYS = (
    "g1", "g2", "galaxy_id", "mag", "mag_source", "hlr_px", "snr",
    "dx", "dy", "rotation", "mirror", "mu", "pair_id",
)


@dataclass
class StampBatch:
    """Rendered stamps and their metadata.

    stamps : (N, ny, nx) float32 [CLASH counts], row = y.
    meta : dict of (N,) arrays: g1, g2 (true shear), galaxy_id, mag (CLASH zero-point, including
        magnification), mag_source (source catalogue magnitude), hlr_px (intrinsic half-light
        radius in target pixels including magnification), snr (matched-filter S/N of the
        noiseless stamp), dx, dy [pixels], rotation [rad], mirror, mu, pair_id.
    failures : list of (galaxy_id, message) for stamps that could not be rendered (not in stamps).
    """

    stamps: np.ndarray
    meta: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.stamps)

    @property
    def shear(self) -> np.ndarray:
        """True shears (N, 2) float32."""
        return np.stack([self.meta["g1"], self.meta["g2"]], axis=1).astype(np.float32)

    def save(self, path) -> Path:
        """Write to ``.npz`` (stamps + meta arrays) or ``.fits`` (image cube + BinTable of meta)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            np.savez(path, stamps=self.stamps, n_failed=len(self.failures),
                     **{f"meta_{k}": v for k, v in self.meta.items()})
        elif path.suffix in (".fits", ".fit"):
            from astropy.io import fits
            from astropy.table import Table

            hdus = fits.HDUList([fits.PrimaryHDU(self.stamps), fits.BinTableHDU(Table(self.meta), name="META")])
            hdus[0].header["NFAILED"] = (len(self.failures), "stamps that failed to render")
            hdus[0].header["PIXSCALE"] = (PIXEL_SCALE, "arcsec/pixel")
            hdus.writeto(path, overwrite=True)
        else:
            raise ValueError(f"unsupported stamp file type {path.suffix!r}; use .npz or .fits")
        return path

    @classmethod
    def load(cls, path) -> "StampBatch":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"stamp file not found: {path}")
        if path.suffix == ".npz":
            with np.load(path) as z:
                meta = {k[5:]: z[k] for k in z.files if k.startswith("meta_")}
                return cls(z["stamps"], meta, [None] * int(z["n_failed"]) if "n_failed" in z.files else [])
        from astropy.io import fits

        with fits.open(path) as h:
            stamps = np.asarray(h[0].data, np.float32)
            meta = {c: np.asarray(h["META"].data[c]) for c in h["META"].columns.names}
            nf = int(h[0].header.get("NFAILED", 0))
        return cls(stamps, meta, [None] * nf)


# ---------------------------------------------------------------------------------------------
# Backends: draw noiseless lensed PSF-convolved galaxies (before mask / flux factor / noise).

BackendFn = Callable[["StampRenderer", StampParams, int], tuple]
_BACKENDS: dict[str, BackendFn] = {}


def register_backend(name: str, fn: BackendFn) -> None:
    """Register a drawing backend ``fn(renderer, params, size) -> (images, failures)``.

    ``images`` is (N, size, size) float; a failed stamp holds NaN and appears in ``failures`` as
    (row index, message).
    """
    _BACKENDS[name] = fn


def _galsim_backend(renderer: "StampRenderer", params: StampParams, size: int):
    out = np.empty((len(params), size, size), dtype=np.float64)
    failures = []
    for i in range(len(params)):
        try:
            out[i] = renderer.draw_galsim(params, i, size).array
        except Exception as err:  # any GalSim failure becomes a recorded skip
            out[i] = np.nan
            failures.append((i, f"{type(err).__name__}: {err}"))
    return out, failures


register_backend("galsim", _galsim_backend)


def _torch_backend(renderer, params, size):  # imported lazily: torch renderer is optional
    from wlshear.sim.torch_render import draw_batch

    return draw_batch(renderer, params, size)


register_backend("torch", _torch_backend)


class StampRenderer:
    """Render CLASH-like stamps of galaxies from a source.

    Parameters
    ----------
    source : GalaxySource
    noise : CorrelatedNoise or None (None = noiseless)
    augment : Augmentation (or dict of its fields)
    population : 'natural', 'homogenised' or 'matched' (see ``wlshear.sim.population``)
    mag_bins : source-magnitude bins for 'homogenised'
    target_catalog : FITS/CSV (mag, hlr_px) table for 'matched'
    psf_fwhm : arcsec; pixel_scale : arcsec / pixel; stamp_size : pixels
    gsparams : dict or GSParams for drawing
    backend : 'galsim' (reference) or another registered backend ('torch')
    galaxy_ids : draw only these galaxies of the source (one side of a galaxy-disjoint split,
        ``wlshear.sim.population.split_galaxies``); None = all
    """

    def __init__(
        self,
        source: GalaxySource,
        noise: CorrelatedNoise | None = None,
        augment: Augmentation | dict | None = None,
        population: str = "natural",
        mag_bins=None,
        target_catalog=None,
        psf_fwhm: float = PSF_FWHM,
        pixel_scale: float = PIXEL_SCALE,
        stamp_size: int = STAMP_SIZE,
        gsparams=None,
        backend: str = "galsim",
        galaxy_ids=None,
    ):
        self.source = source
        self.noise = noise
        if augment is None:
            augment = Augmentation()
        elif not isinstance(augment, Augmentation):
            augment = Augmentation(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(augment).items()})
        self.augment = augment
        self.population = population
        self.galaxy_ids = None if galaxy_ids is None else np.unique(np.asarray(galaxy_ids, dtype=np.int64))
        self.weights = population_weights(source, population, mag_bins, target_catalog, galaxy_ids=self.galaxy_ids)
        self.psf_fwhm = float(psf_fwhm)
        self.pixel_scale = float(pixel_scale)
        self.stamp_size = int(stamp_size)
        self.gsparams = make_gsparams(gsparams)
        if source.gsparams is None and self.gsparams is not None:
            source.gsparams = self.gsparams
        self.psf = make_psf(self.psf_fwhm, self.gsparams)
        if backend not in _BACKENDS:
            raise ValueError(f"unknown renderer backend {backend!r}; available: {sorted(_BACKENDS)}")
        self.backend = backend

    # -- parameters ------------------------------------------------------------------------
    def sample_params(self, rng: np.random.Generator, n: int, ring: bool = False) -> StampParams:
        """Draw shear/augmentation parameters of ``n`` stamps from this renderer's population."""
        return sample_params(rng, n, self.weights, self.augment, ring=ring)

    def with_augment(self, augment: Augmentation) -> "StampRenderer":
        """A shallow copy using other augmentation settings (e.g. ``augment.test_mode()``)."""
        return self._copy(augment=augment)

    def with_stamp_size(self, stamp_size: int) -> "StampRenderer":
        """A shallow copy drawing ``stamp_size`` x ``stamp_size`` stamps (same galaxy centre), e.g.
        with the metacal operator's margin."""
        return self._copy(stamp_size=int(stamp_size))

    def with_noise(self, noise: CorrelatedNoise | None) -> "StampRenderer":
        """A shallow copy (same source, PSF, population) with other background noise (None = none)."""
        return self._copy(noise=noise)

    def with_backend(self, backend: str) -> "StampRenderer":
        """A shallow copy drawing with another registered backend ('galsim', 'torch')."""
        if backend not in _BACKENDS:
            raise ValueError(f"unknown renderer backend {backend!r}; available: {sorted(_BACKENDS)}")
        return self._copy(backend=backend)

    def _copy(self, **changes) -> "StampRenderer":
        new = object.__new__(StampRenderer)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    # -- drawing ---------------------------------------------------------------------------
    def lensed_galaxy(self, params: StampParams, i: int) -> galsim.GSObject:
        """The GalSim profile of stamp ``i``: mirrored, rotated, lensed, PSF-convolved."""
        gal = self.source.galaxy(int(params.galaxy_id[i]))
        if params.mirror[i]:
            gal = gal.transform(-1.0, 0.0, 0.0, 1.0)
        if params.rotation[i] != 0:
            gal = gal.rotate(float(params.rotation[i]) * galsim.radians)
        gal = gal.lens(float(params.g1[i]), float(params.g2[i]), float(params.mu[i]))
        return galsim.Convolve(gal, self.psf, gsparams=self.gsparams)

    def draw_galsim(self, params: StampParams, i: int, size: int | None = None) -> galsim.Image:
        """Draw stamp ``i`` with GalSim (before mask/flux factor/noise). Centre at pixel
        ((size-1)/2 + dx, (size-1)/2 + dy), 0-indexed."""
        size = size or self.stamp_size
        obj = self.lensed_galaxy(params, i)
        return obj.drawImage(
            nx=size, ny=size, scale=self.pixel_scale,
            offset=(float(params.dx[i]), float(params.dy[i])), method="auto",
        )

    def postprocess(self, images: np.ndarray) -> np.ndarray:
        """Mask (source's image-stage threshold) and scale by the source's flux factor -> CLASH counts."""
        out = np.array(images, dtype=np.float64, copy=True)
        thr = self.source.image_mask_threshold
        if thr is not None:
            out[out < thr] = 0.0
        return out * self.source.flux_factor

    def draw_noiseless(self, params: StampParams, size: int | None = None):
        """Noiseless stamps in CLASH counts, shape (N, size, size); failed rows are NaN.

        Returns (images, failures) with failures a list of (row index, message)."""
        size = size or self.stamp_size
        raw, failures = _BACKENDS[self.backend](self, params, size)
        return self.postprocess(raw), failures

    def render(self, params: StampParams, rng: np.random.Generator, noise_groups=None,
               keep_failed: bool = False) -> StampBatch:
        """Noisy stamps and metadata for ``params``; failed stamps are dropped and recorded.

        ``noise_groups``: optional ``(N,)`` non-negative group index per stamp; stamps of one group
        share one noise realisation (e.g. the same galaxy under several shears). Default: every
        stamp has its own noise. ``keep_failed``: keep failed stamps as all-NaN rows (still
        recorded in ``failures``), so rows stay aligned with ``params`` (paired designs).
        """
        clean, failures = self.draw_noiseless(params)
        ok = np.all(np.isfinite(clean), axis=(1, 2))
        bad_rows = {i for i, _ in failures}
        for i in np.nonzero(~ok)[0]:
            if int(i) not in bad_rows:
                failures.append((int(i), "non-finite pixels"))
        n = len(params)
        if self.noise is None:
            noise = 0.0
        elif noise_groups is None:
            noise = self.noise.sample(rng, n, (self.stamp_size, self.stamp_size))
        else:
            grp = np.asarray(noise_groups, dtype=np.int64)
            noise = self.noise.sample(rng, int(grp.max()) + 1, (self.stamp_size, self.stamp_size))[grp]
        stamps = (clean + noise).astype(np.float32)
        if self.noise is not None:
            snr = self.noise.snr(np.where(ok[:, None, None], clean, 0.0))
        else:
            snr = np.full(n, np.inf)
        meta = self.metadata(params)
        meta["snr"] = np.asarray(snr, dtype=np.float64)
        fail_info = [(int(params.galaxy_id[i]), msg) for i, msg in failures]
        for gid, msg in fail_info:
            log.warning("skipped galaxy %d: %s", gid, msg)
        if keep_failed:
            stamps[~ok] = np.nan
            return StampBatch(stamps, meta, fail_info)
        return StampBatch(stamps[ok], {k: v[ok] for k, v in meta.items()}, fail_info)

    def render_shear_pairs(self, galaxy_ids, n_orient: int, shear: float, seed, chunk: int = 4000,
                           progress: bool = False) -> tuple[StampBatch, dict]:
        """Stamps of the +-g common-noise ring design (``wlshear.sim.augment.shear_pair_params``).

        Rows stay aligned with the design: a failed stamp is an all-NaN row (and recorded in
        ``failures``). Returns ``(batch, design)``; ``chunk`` (a multiple of 8) stamps share one
        child noise stream, so the result is independent of how it is split into calls.
        """
        from wlshear.sim.augment import shear_pair_params

        if chunk % 8:
            raise ValueError(f"chunk must be a multiple of 8, got {chunk}")
        ss = np.random.SeedSequence(seed)
        p_seq, n_seq = ss.spawn(2)
        params, groups, design = shear_pair_params(galaxy_ids, n_orient, shear, np.random.default_rng(p_seq))
        starts = range(0, len(params), chunk)
        children = n_seq.spawn(len(starts))
        it = zip(starts, children)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(starts), desc=f"rendering {len(params)} +-g stamps ({self.source.name})")
        parts = []
        for s, child in it:
            sub = slice(s, s + chunk)
            grp = groups[sub] - groups[sub][0]
            parts.append(self.render(params.subset(sub), np.random.default_rng(child), noise_groups=grp,
                                     keep_failed=True))
        stamps = np.concatenate([b.stamps for b in parts])
        meta = {k: np.concatenate([b.meta[k] for b in parts]) for k in parts[0].meta}
        return StampBatch(stamps, meta, [f for b in parts for f in b.failures]), design

    def metadata(self, params: StampParams) -> dict:
        cat = self.source.catalog
        gid = params.galaxy_id.astype(np.int64)
        mu = params.mu
        return {
            "g1": params.g1.astype(np.float64),
            "g2": params.g2.astype(np.float64),
            "galaxy_id": gid,
            "mag": cat["mag"][gid] - 2.5 * np.log10(mu),
            "mag_source": cat["mag_source"][gid],
            "hlr_px": cat["hlr_px"][gid] * np.sqrt(mu),
            "dx": params.dx.astype(np.float64),
            "dy": params.dy.astype(np.float64),
            "rotation": params.rotation.astype(np.float64),
            "mirror": params.mirror.astype(bool),
            "mu": mu.astype(np.float64),
            "pair_id": params.pair_id.astype(np.int64),
        }

    def design_params(self, n: int, seed, ring: bool = False) -> StampParams:
        """The parameters of the ``n`` stamps :meth:`simulate` draws from ``seed`` (no rendering)."""
        p_seq, _ = np.random.SeedSequence(seed).spawn(2)
        return self.sample_params(np.random.default_rng(p_seq), n, ring=ring)

    def compare_backends(self, params: StampParams, reference: str = "galsim") -> dict:
        """Noiseless stamps of ``params`` [counts] drawn by this renderer's backend and by
        ``reference`` (same source, PSF, augmentation, mask): ``{"stamps", "reference"}`` (N, S, S),
        ``"residual_over_peak"`` (N,) max |difference| / reference peak, ``"flux_ratio"`` (N,)
        and ``"failed"`` (N,) bool (either backend failed; NaN there)."""
        if reference not in _BACKENDS:
            raise ValueError(f"unknown reference backend {reference!r}; available: {sorted(_BACKENDS)}")
        mine, _ = self.draw_noiseless(params)
        ref, _ = self._copy(backend=reference).draw_noiseless(params)
        failed = ~(np.isfinite(mine).all(axis=(1, 2)) & np.isfinite(ref).all(axis=(1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            peak = np.abs(ref).max(axis=(1, 2))
            res = np.abs(mine - ref).max(axis=(1, 2)) / peak
            flux = mine.sum(axis=(1, 2)) / ref.sum(axis=(1, 2))
        res[failed], flux[failed] = np.nan, np.nan
        return {"stamps": mine, "reference": ref, "residual_over_peak": res, "flux_ratio": flux, "failed": failed}

    def simulate(self, n: int, seed, ring: bool = False, chunk: int = 256, progress: bool = False,
                 workers: int = 0) -> StampBatch:
        """Render ``n`` stamps reproducibly from ``seed`` (int or sequence of ints).

        Parameters are drawn at once from one stream; each chunk of ``chunk`` stamps gets its own
        noise stream, so the result does not depend on ``workers`` (parallel processes) and the
        same seed gives the same galaxies, shears and augmentations on every backend.
        """
        if int(n) != n or n < 0:
            raise ValueError(f"simulate: n must be an integer >= 0, got {n}")
        p_seq, n_seq = np.random.SeedSequence(seed).spawn(2)
        params = self.sample_params(np.random.default_rng(p_seq), n, ring=ring)
        jobs = _ChunkJobs(self, params, chunk, n_seq.entropy if isinstance(n_seq.entropy, int) else list(n_seq.entropy),
                          tuple(n_seq.spawn_key))
        if workers and workers > 0 and len(jobs) > 1:
            from torch.utils.data import DataLoader

            it = iter(DataLoader(jobs, batch_size=None, num_workers=int(workers), collate_fn=_identity))
        else:
            it = (jobs[j] for j in range(len(jobs)))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(jobs), desc=f"rendering {n} stamps ({self.source.name})", unit="chunk")
        return self._joined(list(it))

    def simulate_shifted(self, n: int, seed: int, shift_hlr: float, ring: bool = False,
                         progress: bool = False, distribution: str = "uniform") -> StampBatch:
        """``n`` stamps whose centroid is moved by up to ``shift_hlr`` x each galaxy's (magnified)
        half-light radius ``h`` [pixels] (ring pairs share the shift):

        - ``distribution="uniform"`` (the paper's): dx, dy ~ U(-s h / 2, s h / 2) independently,
          a square of total extent ``s h`` per axis;
        - ``"direction"``: a fixed length ``s h`` in a random direction (harsher: 1.2-2.4x the
          paper's RMS shift).

        Galaxies, shears, shift draws and noise depend only on ``seed``, so every ``shift_hlr`` shows
        the same galaxies (evaluate's centroid study)."""
        p_seq, n_seq, d_seq = np.random.SeedSequence([seed, 104729]).spawn(3)
        params = self.sample_params(np.random.default_rng(p_seq), n, ring=ring)
        n_units = int(params.pair_id.max()) + 1 if n else 0
        d_rng = np.random.default_rng(d_seq)
        if distribution == "uniform":
            u = d_rng.uniform(-0.5, 0.5, (n_units, 2))[params.pair_id]
            ux, uy = u[:, 0], u[:, 1]
        elif distribution == "direction":
            phi = d_rng.uniform(0, 2 * np.pi, n_units)[params.pair_id]
            ux, uy = np.cos(phi), np.sin(phi)
        else:
            raise ValueError(f"centroid shift distribution must be 'uniform' or 'direction', got {distribution!r}")
        hlr = self.source.catalog["hlr_px"][params.galaxy_id.astype(np.int64)] * np.sqrt(params.mu)
        params.dx = shift_hlr * hlr * ux
        params.dy = shift_hlr * hlr * uy
        nrng = np.random.default_rng(n_seq)
        starts = range(0, n, 256)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"rendering shift {shift_hlr:g} hlr", leave=False)
        return self._joined([self.render(params.subset(slice(s, s + 256)), nrng) for s in starts])

    def _joined(self, parts: list[StampBatch]) -> StampBatch:
        """One batch of the rendered ``parts`` (n = 0: an empty batch that still has every meta column)."""
        if not parts:
            return StampBatch(np.zeros((0, self.stamp_size, self.stamp_size), np.float32),
                              {k: np.zeros(0) for k in META_KEYS}, [])
        stamps = np.concatenate([b.stamps for b in parts])
        meta = {k: np.concatenate([b.meta[k] for b in parts]) for k in parts[0].meta}
        failures = [f for b in parts for f in b.failures]
        return StampBatch(stamps, meta, failures)


def _identity(x):
    return x


class _ChunkJobs:
    """Chunks of a parameter set, each rendered with its own noise stream (picklable for workers)."""

    def __init__(self, renderer: StampRenderer, params: StampParams, chunk: int, entropy, spawn_key):
        self.renderer, self.params, self.chunk = renderer, params, max(1, int(chunk))
        self.entropy, self.spawn_key = entropy, spawn_key

    def __len__(self) -> int:
        return -(-len(self.params) // self.chunk)

    def __getitem__(self, j: int) -> StampBatch:
        sub = self.params.subset(slice(j * self.chunk, (j + 1) * self.chunk))
        seq = np.random.SeedSequence(self.entropy, spawn_key=(*self.spawn_key, int(j)))
        return self.renderer.render(sub, np.random.default_rng(seq))
