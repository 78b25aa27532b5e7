"""Datasets of rendered stamps.

``ShearStream``: an IterableDataset that renders training stamps on the fly in DataLoader
workers. The random stream of each worker is seeded from (global seed, epoch, rank, worker id),
so workers and ranks never draw the same stamps and the same seed and worker count reproduce the
same stamps. Stamps that fail to render are skipped and counted (``failure_count``); once a worker
has attempted ``MIN_STREAM_ATTEMPTS`` stamps, a running failure fraction above
``max_failure_fraction`` (``data.stream_max_failure_fraction``, default 5%) stops training with a
:class:`RenderFailureError` naming the first failures.

``CachedStampSet``: a fixed, indexable set (validation, test, head refit) rendered once and
cached on disk as ``.npz`` keyed by a hash of everything that decides its content, including the
size and checksum (or, above 64 MiB, modification time) of every file the source reads. A set is
cached (and used) only when at most ``max_failure_fraction`` (``data.max_failure_fraction``,
default 1%) of its stamps failed to render; above that it raises :class:`RenderFailureError`.
Every re-render is logged with its reason (no cache yet, unreadable cache, too many failures in
the cached set, or the settings / input files that differ from the newest cache of that set).
"""

from __future__ import annotations

import hashlib
import os
import uuid
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from wlshear.sim.render import StampBatch, StampRenderer

log = logging.getLogger(__name__)


#: a worker's training stream is judged against its failure limit once it attempted this many stamps
MIN_STREAM_ATTEMPTS = 100
#: input files up to this size enter cache keys by checksum, larger ones by size and mtime
_CHECKSUM_BYTES = 64 * 2**20


class RenderFailureError(RuntimeError):
    """Too many stamps of a set or of the training stream failed to render."""


def _failure_summary(failures, k: int = 3) -> str:
    msgs = []
    for f in failures:
        if f is None:
            continue
        gid, msg = f
        text = f"galaxy {gid}: {msg}"
        if text not in msgs:
            msgs.append(text)
        if len(msgs) >= k:
            break
    return "; ".join(msgs) if msgs else "(messages not recorded)"


def failure_error(what: str, n_failed: int, n_tried: int, limit: float, key: str, failures=()) -> RenderFailureError:
    """The error for ``n_failed`` of ``n_tried`` stamps failed, above ``limit`` (config ``key``)."""
    return RenderFailureError(
        f"{what}: {n_failed} of {n_tried} stamps ({n_failed / max(n_tried, 1):.0%}) failed to render, above "
        f"{key} = {limit:g}; first failures: {_failure_summary(failures)}. Nothing was cached. Fix the input "
        f"(a truncated or corrupt catalogue / image file?) and rerun, or raise {key}.")


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShearStream(IterableDataset):
    """On-the-fly training stamps.

    Each iteration (epoch) yields ``samples_per_epoch / world_size`` samples on each rank, split
    across the DataLoader workers. Items are ``(stamp (32, 32) float32, shear (2,) float32)``,
    or with ``return_meta=True`` also a dict of per-stamp metadata.
    """

    def __init__(self, renderer: StampRenderer, samples_per_epoch: int, seed: int = 0,
                 chunk: int = 64, return_meta: bool = False, max_failure_fraction: float = 0.05):
        self.renderer = renderer
        self.max_failure_fraction = float(max_failure_fraction)
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.chunk = int(chunk)
        self.return_meta = return_meta
        self.epoch = 0
        self.rank, self.world_size = 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.samples_per_epoch / self.world_size)

    def _share(self, worker_id: int, n_workers: int) -> int:
        per_rank = len(self)
        base, extra = divmod(per_rank, n_workers)
        return base + (1 if worker_id < extra else 0)

    def _count_failures(self, batch: StampBatch, n_tried: int, wid: int) -> None:
        """Add a rendered chunk's failures; raise once the running fraction passes the limit."""
        self.attempted += n_tried
        self.failure_count += len(batch.failures)
        if len(batch.failures) and len(self.first_failures) < 3:
            self.first_failures += list(batch.failures[: 3 - len(self.first_failures)])
        if not len(batch.failures):
            return
        log.warning("worker %d: %d stamp(s) failed to render and were skipped (total %d of %d)",
                    wid, len(batch.failures), self.failure_count, self.attempted)
        if self.attempted >= MIN_STREAM_ATTEMPTS and self.failure_count > self.max_failure_fraction * self.attempted:
            raise failure_error(f"training stream (worker {wid}, epoch {self.epoch})", self.failure_count,
                                self.attempted, self.max_failure_fraction, "data.stream_max_failure_fraction",
                                self.first_failures)

    def worker_seed(self, worker_id: int, epoch: int | None = None) -> list[int]:
        """Seed entropy of one worker's stream: (seed, epoch, rank, worker id)."""
        return [self.seed, self.epoch if epoch is None else int(epoch), self.rank, worker_id]

    def _pass_epoch(self) -> int:
        """The epoch of the pass that is starting. In the main process: ``self.epoch`` (set by
        :class:`EpochLoader`). In a DataLoader worker, which holds its own copy of the stream, the
        copy's epoch plus the passes this copy has already made: a persistent worker (pickled once,
        at the first epoch) draws the same stamps as a fresh worker per epoch would."""
        if get_worker_info() is None:
            return self.epoch
        passes = getattr(self, "_worker_passes", 0)
        self._worker_passes = passes + 1
        return self.epoch + passes

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n = self._share(wid, nw)
        ss = np.random.SeedSequence(self.worker_seed(wid, self._pass_epoch()))
        p_rng, n_rng = (np.random.default_rng(s) for s in ss.spawn(2))
        self.failure_count = self.attempted = 0
        self.first_failures = []
        produced = 0
        while produced < n:
            m = min(self.chunk, n - produced)
            params = self.renderer.sample_params(p_rng, m)
            batch = self.renderer.render(params, n_rng)
            self._count_failures(batch, m, wid)
            for i in range(len(batch)):
                if produced >= n:
                    break
                x = torch.from_numpy(batch.stamps[i])
                y = torch.tensor([batch.meta["g1"][i], batch.meta["g2"][i]], dtype=torch.float32)
                if self.return_meta:
                    yield x, y, {k: v[i] for k, v in batch.meta.items()}
                else:
                    yield x, y
                produced += 1


def grouped_params(renderer: StampRenderer, rng: np.random.Generator, n_groups: int, group_size: int):
    """Parameters of ``n_groups`` groups of ``group_size`` stamps: each group is one galaxy with one
    rotation, mirror, magnification and centroid shift, and ``group_size`` independent shears
    g1, g2 from the augmentation's shear prior. Rows are ordered group by group; ``pair_id`` = group index."""
    from wlshear.sim.augment import StampParams

    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a response needs two shears), got {group_size}")
    base = renderer.sample_params(rng, n_groups)
    rep = np.repeat(np.arange(n_groups), group_size)
    p = base.subset(rep)
    p.g1, p.g2 = renderer.augment.sample_shear(rng, len(rep))
    p.pair_id = rep.astype(np.int64)
    return StampParams(**p.as_dict())


class GroupedShearStream(ShearStream):
    """On-the-fly training groups: K stamps of one galaxy under K different shears.

    Each item is one group: ``(stamps (K, 32, 32) float32, shears (K, 2) float32)`` (plus, with
    ``return_meta``, a dict of ``(K,)`` meta arrays including ``galaxy_id``). The members share
    galaxy id, rotation, mirror, magnification and centroid shift, and (``same_noise=True``, default)
    one noise realisation, so only the shear differs (``same_noise=False``: independent noise); the
    per-galaxy response of a network can then be measured inside a batch
    (``wlshear.models.objectives.ConditionalBiasLoss``). ``samples_per_epoch`` counts stamps; an
    epoch yields ``samples_per_epoch // group_size`` groups (per rank, split across workers). A
    group with a stamp that failed to render is dropped (counted in ``failure_count``).
    """

    def __init__(self, renderer: StampRenderer, samples_per_epoch: int, group_size: int = 8, seed: int = 0,
                 chunk: int = 64, return_meta: bool = False, same_noise: bool = True,
                 max_failure_fraction: float = 0.05):
        super().__init__(renderer, samples_per_epoch, seed=seed, chunk=chunk, return_meta=return_meta,
                         max_failure_fraction=max_failure_fraction)
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        self.group_size = int(group_size)
        self.same_noise = bool(same_noise)

    def render_groups(self, params, n_rng: np.random.Generator) -> StampBatch:
        """Render grouped ``params``; with ``same_noise`` the members of a group share one noise
        realisation (only the shear differs, so a group's prediction-vs-shear slope is the galaxy's
        response with little noise), else each stamp has its own noise (``renderer.render``)."""
        groups = np.asarray(params.pair_id) if self.same_noise else None
        return self.renderer.render(params, n_rng, noise_groups=groups)

    def __len__(self) -> int:  # groups per rank
        return max(1, math.ceil(self.samples_per_epoch / self.group_size / self.world_size))

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n = self._share(wid, nw)
        ss = np.random.SeedSequence(self.worker_seed(wid, self._pass_epoch()) + [self.group_size])
        p_rng, n_rng = (np.random.default_rng(s) for s in ss.spawn(2))
        self.failure_count = self.attempted = 0
        self.first_failures = []
        produced = 0
        k = self.group_size
        per_chunk = max(1, self.chunk // k)
        while produced < n:
            params = grouped_params(self.renderer, p_rng, per_chunk, k)
            batch = self.render_groups(params, n_rng)
            self._count_failures(batch, len(params), wid)
            grp = batch.meta["pair_id"]
            for gi in np.unique(grp):
                if produced >= n:
                    break
                rows = np.nonzero(grp == gi)[0]
                if len(rows) != k:  # a member failed to render: drop the group
                    continue
                x = torch.from_numpy(np.ascontiguousarray(batch.stamps[rows]))
                y = torch.from_numpy(np.stack([batch.meta["g1"][rows], batch.meta["g2"][rows]], 1).astype(np.float32))
                if self.return_meta:
                    yield x, y, {key: v[rows] for key, v in batch.meta.items()}
                else:
                    yield x, y
                produced += 1


class EpochLoader(DataLoader):
    """DataLoader that advances its ShearStream's epoch each time it is iterated, so each pass
    renders fresh stamps. The rank is captured in the main process, where torch.distributed is
    initialised.

    Workers are persistent by default (``persistent_workers=None``: whenever ``num_workers`` > 0):
    what a worker prepares once (radial tables, prepared galaxies of the torch backend, GalSim's
    profile caches) serves every epoch. A persistent worker counts its own passes
    (``ShearStream._pass_epoch``), so the stamps are the same as with ``persistent_workers=False``,
    where the stream is pickled into fresh workers at every ``iter()``.
    """

    def __init__(self, dataset: ShearStream, start_epoch: int = 0, persistent_workers: bool | None = None, **kw):
        if persistent_workers is None:
            persistent_workers = int(kw.get("num_workers", 0) or 0) > 0
        kw["persistent_workers"] = bool(persistent_workers)
        super().__init__(dataset, **kw)
        self.passes = int(start_epoch)

    def __iter__(self):
        ds = self.dataset
        ds.rank, ds.world_size = _dist_rank_world()
        ds.set_epoch(self.passes)
        self.passes += 1
        return super().__iter__()

    def __len__(self) -> int:  # length per rank in batches
        ds = self.dataset
        ds.rank, ds.world_size = _dist_rank_world()
        return super().__len__()


def _config_hash(desc: dict) -> str:
    return hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_fingerprint(path) -> dict:
    """Size and content of an input file for cache keys: SHA-1 up to 64 MiB, else modification
    time (ns); a missing file is recorded as such."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"missing": True}
    if st.st_size <= _CHECKSUM_BYTES:
        h = hashlib.sha1()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        return {"size": st.st_size, "sha1": h.hexdigest()[:16]}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def renderer_description(renderer: StampRenderer) -> dict:
    """A JSON-able description of everything that decides a rendered set (for cache keys).

    Includes a fingerprint (:func:`file_fingerprint`) of every file the source reads
    (``source.input_files()``): a set rendered from a damaged file is never reused once the file
    is repaired. The noise kernel and a target catalogue enter through their content (kernel
    values, population weights).
    """
    src = renderer.source
    src_desc = {k: v for k, v in vars(src).items() if isinstance(v, (int, float, str, bool, tuple, type(None)))}
    src_desc["class"] = type(src).__name__
    src_desc["n"] = len(src)
    src_desc["catalog_head"] = {k: np.asarray(v)[:50].tolist() for k, v in src.catalog.items() if k in ("mag", "hlr_px")}
    if hasattr(src, "catalog_path"):
        src_desc["catalog_path"] = str(src.catalog_path)
    files = src.input_files() if hasattr(src, "input_files") else []
    if files:
        src_desc["files"] = {Path(f).name: file_fingerprint(f) for f in files}
    gsp = renderer.gsparams
    return {
        "source": src_desc,
        "noise": None if renderer.noise is None else {
            "kernel": np.round(renderer.noise.base_kernel, 12).tolist(), "scale": renderer.noise.scale},
        "augment": _augment_description(renderer.augment),
        "population": renderer.population,
        "weights_sha": hashlib.sha1(np.ascontiguousarray(renderer.weights).tobytes()).hexdigest()[:12],
        "psf_fwhm": renderer.psf_fwhm,
        "pixel_scale": renderer.pixel_scale,
        "stamp_size": renderer.stamp_size,
        "gsparams": None if gsp is None else repr(gsp),
        "backend": renderer.backend,
    }


def _augment_description(aug) -> dict:
    """The augmentation's fields; the shear-prior fields only when the prior is not the paper's
    uniform one, so sets cached before the Gaussian option existed keep their keys."""
    d = dict(vars(aug))
    if d.get("shear_prior", "uniform") == "uniform":
        d.pop("shear_prior", None)
        d.pop("shear_sigma", None)
    return d


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v, n: int = 60) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def why_no_cache(path: Path, desc: dict) -> str:
    """Why there is no cache at ``path``: what differs from the newest cache of the same set name
    (its ``.json`` description), or that none exists yet."""
    name = path.stem.rsplit("_", 1)[0]
    others = sorted((p for p in path.parent.glob(f"{name}_*.json") if p.stem.rsplit("_", 1)[0] == name
                     and p.with_suffix(".npz").exists()), key=lambda p: p.stat().st_mtime, reverse=True)
    if not others:
        return f"no cached {name} set yet"
    try:
        old = _flatten(json.loads(others[0].read_text()))
    except (OSError, ValueError):
        return f"no cache with this key ({others[0].name} unreadable)"
    new = _flatten(json.loads(json.dumps(desc, default=str)))
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = ", ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in diff[:4])
    more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
    return f"settings or input files differ from the cached {others[0].with_suffix('.npz').name}: {shown}{more}"


def load_cached(path: Path, name: str, n: int, max_failure_fraction: float) -> StampBatch | None:
    """A cached set at ``path``, or None (logged with the reason) when it is unreadable or holds
    more failed stamps than ``max_failure_fraction`` of ``n`` (e.g. written by an older version)."""
    try:
        batch = StampBatch.load(path)
    except Exception as err:  # a corrupt cache is re-rendered, not fatal
        log.warning("re-rendering %s set: cache %s unreadable (%s)", name, path, err)
        return None
    if len(batch.failures) > max_failure_fraction * n:
        log.warning("re-rendering %s set: cache %s lost %d of %d stamps, above data.max_failure_fraction = %g",
                    name, path, len(batch.failures), n, max_failure_fraction)
        return None
    log.info("loaded cached %s set (%d stamps) from %s", name, len(batch), path)
    return batch


def save_cached(path: Path, batch: StampBatch, desc: dict, name: str, n: int, max_failure_fraction: float) -> None:
    """Check the failure fraction (raise :class:`RenderFailureError` above the limit, caching
    nothing), then write ``batch`` and its description atomically."""
    if len(batch.failures) > max_failure_fraction * n:
        raise failure_error(f"{name} set", len(batch.failures), n, max_failure_fraction,
                            "data.max_failure_fraction", batch.failures)
    if len(batch.failures):
        log.warning("%s set: %d of %d stamp(s) failed to render and were skipped (within data.max_failure_fraction"
                    " = %g)", name, len(batch.failures), n, max_failure_fraction)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique temporary name: several processes (DDP ranks) may render the same set at once; each
    # writes its own file and atomically replaces the (identical) target
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npz")
    batch.save(tmp)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(desc, indent=1, default=str))


class CachedStampSet(Dataset):
    """A fixed, seeded set of stamps, rendered once and cached as ``.npz``.

    The cache file name holds a hash of the renderer description (including the input files'
    fingerprints), n, seed and ring flag, so a changed configuration or input file never reuses a
    stale cache. ``workers`` renders in parallel processes (the result does not depend on it).
    More than ``max_failure_fraction`` of ``n`` stamps failing to render raises
    :class:`RenderFailureError` and caches nothing. ``centroid_shift_hlr``: every centroid moved by
    up to that many half-light radii, drawn from ``centroid_distribution``
    (``StampRenderer.simulate_shifted``: ``uniform`` per axis as the paper, or ``direction``).
    """

    def __init__(self, renderer: StampRenderer, n: int, seed: int, cache_dir=None, ring: bool = False,
                 name: str = "set", progress: bool = True, workers: int = 0, max_failure_fraction: float = 0.01,
                 centroid_shift_hlr: float | None = None, centroid_distribution: str = "uniform"):
        self.n, self.seed, self.ring = int(n), int(seed), bool(ring)
        self.max_failure_fraction = float(max_failure_fraction)
        desc = {"renderer": renderer_description(renderer), "n": self.n, "seed": self.seed, "ring": self.ring}
        if centroid_shift_hlr is not None:
            desc.update(shift_hlr=float(centroid_shift_hlr), kind="centroid")
            if centroid_distribution != "direction":  # (cache keys of the old default stay valid)
                desc.update(shift_distribution=str(centroid_distribution))
        self.key = _config_hash(desc)
        self.path = None
        batch = None
        if cache_dir is not None:
            self.path = Path(cache_dir).expanduser() / f"{name}_{self.key}.npz"
            if self.path.exists():
                batch = load_cached(self.path, name, self.n, self.max_failure_fraction)
            else:
                why = why_no_cache(self.path, desc)
                # a changed input file is worth a warning; new settings (another noise level, n) are routine
                log.log(logging.WARNING if ".files." in why else logging.INFO,
                        "rendering %s set (%d stamps): %s", name, self.n, why)
        if batch is None:
            if centroid_shift_hlr is None:
                batch = renderer.simulate(self.n, [self.seed, 7919], ring=self.ring, progress=progress,
                                          chunk=128, workers=workers)
            else:
                batch = renderer.simulate_shifted(self.n, self.seed, float(centroid_shift_hlr), ring=self.ring,
                                                  progress=progress, distribution=centroid_distribution)
            save_cached(self.path, batch, desc, name, self.n, self.max_failure_fraction)
        self.batch = batch
        self.stamps = torch.from_numpy(np.ascontiguousarray(batch.stamps, dtype=np.float32))
        self.shear = torch.from_numpy(batch.shear)

    @property
    def meta(self) -> dict:
        return self.batch.meta

    def __len__(self) -> int:
        return len(self.stamps)

    def __getitem__(self, i):
        return self.stamps[i], self.shear[i]
