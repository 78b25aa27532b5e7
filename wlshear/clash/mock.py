"""Mock CLASH cluster fields: galaxies from the project's renderer, lensed by an NFW halo.

A mock field is written in the public CLASH layout so that the real-data pipeline
(``infer_clash.py`` / :mod:`wlshear.tasks.infer_clash`) runs on it unchanged:

- ``hlsp_clash_hst_acs-65mas_{cluster}_{filter}_v1_drz.fits`` and ``..._wht.fits`` for the 7 ACS
  filters, float32, with a TAN WCS (0.065"/px, north up, east left: CD1_1 < 0, CD2_2 > 0);
- ``{cluster}_wl_catalogue.fits``: a baseline weak-lensing catalogue (RA, DEC, G1, G2 in the sky
  frame (east, north) as published catalogues give them, MAG, ID)
  from the moments estimator (:mod:`wlshear.baselines.moments`) on 32x32 stamps cut at the true
  positions, calibrated by dividing by its response ``1 + m`` (measured on a simulated ring-pair
  set of the same population and noise, or a configured constant);
- ``{cluster}_truth.fits``: one row per rendered object with ``x``, ``y`` (0-indexed pixels),
  ``ra``, ``dec`` (deg), ``g1``, ``g2`` (reduced shear applied), ``kappa``, ``mu``, ``mag``
  (CLASH zero-point, including magnification), ``hlr`` (intrinsic half-light radius in pixels,
  including magnification), ``is_star``, ``galaxy_id``, ``in_mask`` (position in a bad region);
- ``{cluster}_mock.json``: the generating parameters (NFW halo, centre, noise, regions, counts)
  and the ``truth`` block that ``conf/infer_clash.yaml`` accepts (``clusters[i].truth``).

Rendering. Every galaxy is a :class:`~wlshear.sim.augment.StampParams` row (galaxy id drawn from
the renderer's population weights, (g1, g2) the NFW reduced shear at its position, random rotation
and mirror, ``mu`` the NFW magnification (or 1), ``dx``, ``dy`` the sub-pixel offset of its
position) drawn noiseless by ``StampRenderer.draw_noiseless(params, size=stamp_size)`` (64 px by
default) and added into the field; stamps leaving the image are clipped. Stars are the renderer's
PSF (``renderer.psf``) at bright magnitudes. Galaxies are not placed where the reduced shear is
undefined or strong (kappa >= ``kappa_max`` or |g| >= ``g_max``: the strong-lensing core).

Noise and weights. One correlated-noise realisation over the whole field,
``fftconvolve(white, K)`` with the CLASH kernel K (:class:`~wlshear.sim.noise.CorrelatedNoise`,
per-pixel sigma ``sqrt(sum K^2)``). **Choice of filter images:** every filter holds the *same*
total image, and each filter's weight is ``w = ivar_total / n_filters`` with
``ivar_total = 1 / sigma^2`` (``1/sigma_pixel^2``), so that
:func:`wlshear.clash.io.combine_filters` (mean of the filters; ``n^2 / sum 1/w``) reproduces
exactly the intended total image and inverse variance. Regions:

- *shallow* rectangle (default on): the exposure is ``shallow_depth`` (1/3) of the nominal: the
  noise there is multiplied by ``1/sqrt(depth)`` and all weights by ``depth`` (tests the mean-ivar
  cut without making pixels bad);
- *masked* rectangle: weight 50 (< 100) in one filter -> bad pixels after combining;
- *NaN* square: NaN science pixels in one filter -> bad pixels.

Command line (composes ``conf/mock_field.yaml``; the galaxies, noise and PSF come from the ``data``
group, as train.py's)::

    python -m wlshear.tasks.mock_field out=outputs/clash_mock [mock.size=1200] [mock.m200=6e14]
        [mock.n_galaxies=N] [seed=0] [data/source=cosmos_real_100] [data/noise=half]
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from wlshear.baselines.moments import MomentsEstimator
from wlshear.metrics.bias import fit_bias
from wlshear.sim.augment import Augmentation, StampParams
from wlshear.sim.constants import FAST_GSPARAMS, PIXEL_SCALE, PSF_FWHM, ZP_CLASH
from wlshear.sim.noise import CorrelatedNoise
from wlshear.sim.render import StampRenderer
from wlshear.sim.structured import StructuredSource

from .io import DEFAULT_FILTERS, SCI_PATTERN, WHT_PATTERN
from .lensing import nfw_magnification, nfw_reduced_shear, pixel_to_sky_shear
from .stamps import extract_stamps, stamp_origin

log = logging.getLogger(__name__)

@dataclass
class MockConfig:
    """Parameters of a mock field (``conf/mock_field.yaml``: ``mock.*`` and the ``data`` group).

    Geometry: ``size`` (pixels, square field) at ``pixel_scale`` arcsec/px, WCS reference
    (``ra0``, ``dec0``) in degrees at the image centre, the north-up / east-left layout turned by
    ``wcs_rotation_deg`` on the sky (the baseline catalogue's G1/G2 are in the sky frame). Galaxies: ``n_galaxies`` (None:
    ``density_per_arcmin2`` x the field area, or without it 800 per 1200x1200 px, i.e. ~470 per
    arcmin^2; the paper assumes 37) uniform positions at least ``min_sep_px`` apart, drawn from
    ``source`` (a :class:`~wlshear.sim.sources.GalaxySource`; None = the embedded structured
    population), convolved with the Gaussian PSF of FWHM ``psf_fwhm`` [arcsec].
    Lens: NFW of ``m200`` [Msun], concentration ``conc`` at ``z_lens`` for sources at ``z_source``,
    centred at ``center`` (pixels; None = image centre); ``magnification`` uses the NFW mu.
    Stars: ``n_stars`` PSF images with magnitudes uniform in ``star_mag_range``.
    Noise: CLASH kernel (``noise_kernel`` path or None) times ``noise_scale``.
    Regions (x0, y0, width, height as fractions of the field): ``shallow_rect`` (depth
    ``shallow_depth``), ``masked_rect`` (weight 50 in filter ``masked_filter``), ``nan_rect``.
    Baseline catalogue: ``baseline_response`` (None = measure on ``n_calib`` simulated ring-pair
    stamps of the same population and noise).
    """

    cluster: str = "mock"
    size: int = 1200
    pixel_scale: float = PIXEL_SCALE
    ra0: float = 42.014
    dec0: float = -3.529
    wcs_rotation_deg: float = 0.0
    filters: tuple = DEFAULT_FILTERS
    n_galaxies: int | None = None
    density_per_arcmin2: float | None = None
    min_sep_px: float = 20.0
    source: Any = None
    psf_fwhm: float = PSF_FWHM
    stamp_size: int = 64
    m200: float = 6e14
    conc: float = 4.0
    z_lens: float = 0.3
    z_source: float = 1.0
    center: tuple | None = None
    magnification: bool = True
    kappa_max: float = 0.8
    g_max: float = 0.6
    n_stars: int = 12
    star_mag_range: tuple = (18.5, 22.5)
    noise_kernel: str | None = None
    noise_scale: float = 1.0
    shallow_rect: tuple | None = (0.0, 0.0, 0.22, 0.22)
    shallow_depth: float = 1.0 / 3.0
    masked_rect: tuple | None = (0.78, 0.0, 0.22, 0.12)
    masked_filter: str = "f606w"
    nan_rect: tuple | None = (0.45, 0.88, 0.04, 0.04)
    baseline_response: float | None = None
    n_calib: int = 1000
    seed: int = 0
    gsparams: dict = field(default_factory=lambda: dict(FAST_GSPARAMS))
    progress: bool = True

    def n_gal(self) -> int:
        if self.n_galaxies is not None:
            return int(self.n_galaxies)
        if self.density_per_arcmin2 is not None:
            area = (self.size * self.pixel_scale / 60.0) ** 2  # arcmin^2
            return max(1, int(round(float(self.density_per_arcmin2) * area)))
        return int(round(800 * (self.size / 1200.0) ** 2))


# ----------------------------------------------------------------------------- helpers


def make_wcs(shape: tuple[int, int], ra0: float, dec0: float, pixel_scale: float = PIXEL_SCALE,
             rotation_deg: float = 0.0) -> WCS:
    """TAN WCS, reference (ra0, dec0) [deg] at the image centre; ``rotation_deg`` = 0: north up /
    east left (CD1_1 < 0, CD2_2 > 0); otherwise that layout turned by ``rotation_deg`` on the sky
    (a telescope roll: CD = R(rotation) diag(-s, s))."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]  # FITS 1-indexed centre
    t = np.radians(float(rotation_deg))
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.cd = rot @ np.array([[-pixel_scale / 3600.0, 0.0], [0.0, pixel_scale / 3600.0]])
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    w.pixel_shape = (nx, ny)
    w.wcs.set()
    return w


def _rect_slices(rect, shape) -> tuple[slice, slice] | None:
    """(y, x) slices of a rectangle given as fractions (x0, y0, w, h) of the field."""
    if rect is None:
        return None
    ny, nx = shape
    x0, y0, w, h = (float(v) for v in rect)
    xa, ya = int(round(x0 * nx)), int(round(y0 * ny))
    xb, yb = int(round((x0 + w) * nx)), int(round((y0 + h) * ny))
    xa, xb = max(0, xa), min(nx, max(xb, xa + 1))
    ya, yb = max(0, ya), min(ny, max(yb, ya + 1))
    return slice(ya, yb), slice(xa, xb)


def sample_positions(rng, n: int, shape, min_sep: float, accept=None, max_tries: int = 50) -> np.ndarray:
    """Uniform (x, y) pixel positions over the field, pairwise >= ``min_sep`` apart (greedy
    rejection on a cell hash), optionally restricted by ``accept(x, y) -> bool array``."""
    ny, nx = shape
    cell = max(min_sep, 1.0)
    grid: dict = {}
    out = []
    for _ in range(max_tries):
        need = n - len(out)
        if need <= 0:
            break
        cand = np.column_stack([rng.uniform(-0.5, nx - 0.5, 2 * need), rng.uniform(-0.5, ny - 0.5, 2 * need)])
        if accept is not None:
            cand = cand[accept(cand[:, 0], cand[:, 1])]
        for x, y in cand:
            if len(out) >= n:
                break
            cx, cy = int(x // cell), int(y // cell)
            ok = True
            if min_sep > 0:
                for ix in (cx - 1, cx, cx + 1):
                    for iy in (cy - 1, cy, cy + 1):
                        for (px, py) in grid.get((ix, iy), ()):
                            if (px - x) ** 2 + (py - y) ** 2 < min_sep**2:
                                ok = False
                                break
                        if not ok:
                            break
                    if not ok:
                        break
            if ok:
                grid.setdefault((cx, cy), []).append((x, y))
                out.append((x, y))
    if len(out) < n:
        raise ValueError(
            f"could only place {len(out)} of {n} objects {min_sep} px apart in a {shape} field; "
            "lower n_galaxies or min_sep_px"
        )
    return np.asarray(out, dtype=np.float64)


def add_stamps(image: np.ndarray, stamps: np.ndarray, x, y) -> None:
    """Add (N, S, S) stamps centred at pixel positions (x, y) (0-indexed, centre of an even stamp at
    ((S-1)/2 + dx) with dx = x - (x0 + (S-1)/2)), clipping at the image edges; NaN stamps skipped."""
    ny, nx = image.shape
    size = stamps.shape[1]
    x0s, y0s = stamp_origin(x, y, size)
    for st, x0, y0 in zip(stamps, x0s, y0s):
        if not np.isfinite(st).all():
            continue
        xa, ya = max(0, x0), max(0, y0)
        xb, yb = min(nx, x0 + size), min(ny, y0 + size)
        if xb <= xa or yb <= ya:
            continue
        image[ya:yb, xa:xb] += st[ya - y0 : yb - y0, xa - x0 : xb - x0]


def build_renderer(cfg: MockConfig) -> StampRenderer:
    """The project's StampRenderer for the configured population (no noise: added field-wide)."""
    src = cfg.source if cfg.source is not None else StructuredSource(gsparams=cfg.gsparams)
    return StampRenderer(src, None, Augmentation().test_mode(), population="natural", psf_fwhm=cfg.psf_fwhm,
                         pixel_scale=cfg.pixel_scale, gsparams=cfg.gsparams)


def measure_baseline_response(renderer, noise, n: int = 1000, seed: int = 0) -> dict:
    """Response ``1 + m`` of the moments estimator on ``n`` ring-pair stamps of the renderer's
    population with ``noise`` (shape-noise cancelling), fitted g_est = (1 + m) g_true + c."""
    n = max(2, n - n % 2)
    batch = renderer.with_noise(noise).simulate(n, seed, ring=True)
    chi, failed = MomentsEstimator().estimate(batch.stamps)
    ok = ~failed & np.isfinite(chi).all(axis=1)
    fit = fit_bias(batch.shear.astype(np.float64), chi, failed=~ok, pair_ids=batch.meta["pair_id"])
    m = np.asarray(fit.m, dtype=np.float64)
    return {"response": float(1.0 + m.mean()), "m": m.tolist(), "c": np.asarray(fit.c).tolist(),
            "n": int(ok.sum()), "n_failed": int((~ok).sum())}


# ----------------------------------------------------------------------------- the field, step by step


@dataclass
class _Lens:
    """The NFW lens of a mock: reduced shear and convergence at pixel positions."""

    cfg: MockConfig
    center: tuple[float, float]

    def __call__(self, x, y):
        ps = self.cfg.pixel_scale
        return nfw_reduced_shear((x - self.center[0]) * ps, (y - self.center[1]) * ps, self.cfg.m200, self.cfg.conc,
                                 self.cfg.z_lens, self.cfg.z_source, kappa_max=self.cfg.kappa_max)

    def weak(self, x, y) -> np.ndarray:
        """Positions where the reduced shear is defined and weak (no strong-lensing core)."""
        g1, g2, kappa = self(x, y)
        return np.isfinite(g1) & np.isfinite(g2) & (np.hypot(g1, g2) < self.cfg.g_max) & (kappa < self.cfg.kappa_max)


def _galaxy_params(cfg: MockConfig, renderer, lens: _Lens, gxy: np.ndarray, rng) -> tuple[StampParams, tuple]:
    """Stamp parameters of every galaxy at positions ``gxy``; also (g1, g2, kappa, mu)."""
    n_gal = len(gxy)
    g1, g2, kappa = lens(gxy[:, 0], gxy[:, 1])
    mu = nfw_magnification(g1, g2, kappa) if cfg.magnification else np.ones(n_gal)
    x0, y0 = stamp_origin(gxy[:, 0], gxy[:, 1], cfg.stamp_size)
    half = (cfg.stamp_size - 1) / 2.0
    params = StampParams(
        galaxy_id=rng.choice(len(renderer.weights), size=n_gal, p=renderer.weights),
        g1=g1, g2=g2,
        rotation=rng.uniform(0.0, 2 * np.pi, n_gal),
        mirror=rng.random(n_gal) < 0.5,
        mu=mu,
        dx=gxy[:, 0] - (x0 + half),
        dy=gxy[:, 1] - (y0 + half),
    )
    return params, (g1, g2, kappa, mu)


def _draw_galaxies(cfg: MockConfig, renderer, params: StampParams, gxy, clean: np.ndarray) -> np.ndarray:
    """Add every galaxy's noiseless stamp into ``clean``; returns the rendered (not failed) mask."""
    from tqdm.auto import tqdm

    n_gal, chunk, failures = len(gxy), 100, []
    it = range(0, n_gal, chunk)
    if cfg.progress:
        it = tqdm(it, desc=f"mock {cfg.cluster}: rendering {n_gal} galaxies", unit="chunk")
    for s in it:
        imgs, fails = renderer.draw_noiseless(params.subset(slice(s, s + chunk)), size=cfg.stamp_size)
        failures += [(int(s + i), msg) for i, msg in fails]
        add_stamps(clean, imgs, gxy[s : s + chunk, 0], gxy[s : s + chunk, 1])
    rendered = np.ones(n_gal, dtype=bool)
    for i, msg in failures:
        rendered[i] = False
        log.warning("mock: galaxy %d failed to render and is left out: %s", i, msg)
    return rendered


def _draw_stars(cfg: MockConfig, renderer, sxy: np.ndarray, clean: np.ndarray, rng) -> np.ndarray:
    """Add stars (the renderer's PSF at bright magnitudes) into ``clean``; returns their magnitudes."""
    n_star, size = len(sxy), cfg.stamp_size
    star_mag = rng.uniform(*cfg.star_mag_range, n_star)
    sx0, sy0 = stamp_origin(sxy[:, 0], sxy[:, 1], size)
    half = (size - 1) / 2.0
    stars = np.empty((n_star, size, size))
    for k in range(n_star):
        flux = 10 ** (-0.4 * (star_mag[k] - ZP_CLASH))
        stars[k] = renderer.psf.withFlux(flux).drawImage(
            nx=size, ny=size, scale=cfg.pixel_scale,
            offset=(float(sxy[k, 0] - (sx0[k] + half)), float(sxy[k, 1] - (sy0[k] + half))),
        ).array
    add_stamps(clean, stars, sxy[:, 0], sxy[:, 1])
    return star_mag


def _add_noise(cfg: MockConfig, clean: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, CorrelatedNoise]:
    """(total image, inverse variance, depth map, noise model): one correlated-noise realisation over
    the field, deeper noise in the shallow rectangle."""
    noise_model = CorrelatedNoise(cfg.noise_kernel, cfg.noise_scale)
    sigma = noise_model.sigma
    if sigma <= 0:
        raise ValueError("mock fields need noise (noise_scale > 0): the weight maps are 1/sigma^2")
    noise = noise_model.sample(rng, 1, clean.shape, dtype=np.float64)[0]
    depth = np.ones(clean.shape)
    sh = _rect_slices(cfg.shallow_rect, clean.shape)
    if sh is not None:
        depth[sh] = cfg.shallow_depth
    return clean + noise / np.sqrt(depth), depth / sigma**2, depth, noise_model


def _write_filters(cfg: MockConfig, total, ivar_total, wcs, out_dir: Path) -> tuple[dict, np.ndarray]:
    """Per-filter science and weight files (identical science images, weights ivar_total / n; the
    masked and NaN regions in one filter each). Returns (file paths, truly bad pixels)."""
    filters = list(cfg.filters)
    hdr = wcs.to_header()
    hdr["BUNIT"] = ("ELECTRONS/S", "counts per second (CLASH units)")
    hdr["PHOTZPT"] = (ZP_CLASH, "AB zero point of 1 count/s")
    hdr["MOCK"] = (True, "wlshear.clash.mock field")
    hdr["CLUSTER"] = cfg.cluster
    hdr["NFWM200"] = (cfg.m200, "Msun")
    hdr["NFWCONC"] = cfg.conc
    hdr["ZLENS"] = cfg.z_lens
    hdr["ZSOURCE"] = cfg.z_source
    bad_truth = np.zeros(total.shape, dtype=bool)
    mk = _rect_slices(cfg.masked_rect, total.shape)
    nn = _rect_slices(cfg.nan_rect, total.shape)
    paths = {"sci": [], "wht": []}
    for filt in filters:
        sci = total.astype(np.float32)
        wht = (ivar_total / len(filters)).astype(np.float32)
        if mk is not None and filt == cfg.masked_filter:
            wht[mk] = 50.0
            bad_truth[mk] = True
        if nn is not None and filt == filters[0]:
            sci[nn] = np.nan
            bad_truth[nn] = True
        h = hdr.copy()
        h["FILTER"] = filt.upper()
        for kind, arr, pattern in (("sci", sci, SCI_PATTERN), ("wht", wht, WHT_PATTERN)):
            path = out_dir / pattern.format(cluster=cfg.cluster, filter=filt)
            fits.PrimaryHDU(arr, header=h).writeto(path, overwrite=True)
            paths[kind].append(str(path))
    return paths, bad_truth


def _truth_table(renderer, lens: _Lens, gxy, sxy, params, lensing, star_mag, rendered, bad_truth, depth, wcs) -> Table:
    """One row per rendered object (galaxies, then stars) with its true position, shear and photometry."""
    g1, g2, kappa, mu = lensing
    cat, gid = renderer.source.catalog, params.galaxy_id
    ny, nx = bad_truth.shape
    n_star, nr = len(sxy), int(rendered.sum())
    all_x = np.concatenate([gxy[rendered, 0], sxy[:, 0]])
    all_y = np.concatenate([gxy[rendered, 1], sxy[:, 1]])
    ra, dec = wcs.pixel_to_world_values(all_x, all_y)
    sg1, sg2, skap = lens(sxy[:, 0], sxy[:, 1])
    ix = np.clip(np.round(all_x).astype(int), 0, nx - 1)
    iy = np.clip(np.round(all_y).astype(int), 0, ny - 1)
    truth = Table({
        "id": np.arange(nr + n_star, dtype=np.int64),
        "x": all_x, "y": all_y, "ra": ra, "dec": dec,
        "g1": np.concatenate([g1[rendered], np.zeros(n_star)]),
        "g2": np.concatenate([g2[rendered], np.zeros(n_star)]),
        "g1_lens": np.concatenate([g1[rendered], sg1]),
        "g2_lens": np.concatenate([g2[rendered], sg2]),
        "kappa": np.concatenate([kappa[rendered], skap]),
        "mu": np.concatenate([mu[rendered], np.ones(n_star)]),
        "mag": np.concatenate([cat["mag"][gid[rendered]] - 2.5 * np.log10(mu[rendered]), star_mag]),
        "hlr": np.concatenate([cat["hlr_px"][gid[rendered]] * np.sqrt(mu[rendered]), np.zeros(n_star)]),
        "is_star": np.concatenate([np.zeros(nr, bool), np.ones(n_star, bool)]),
        "galaxy_id": np.concatenate([gid[rendered], np.full(n_star, -1)]),
        "in_mask": bad_truth[iy, ix],
        "depth": depth[iy, ix],
    })
    truth.meta["COMMENT"] = ["g1/g2: reduced shear applied (0 for stars); g1_lens/g2_lens: NFW at the position"]
    return truth


def _baseline_catalogue(cfg: MockConfig, renderer, noise_model, total, bad_truth, truth: Table, cal_seed,
                        wcs) -> tuple[Table, dict]:
    """Moments shapes on 32 px stamps of the total image at the true galaxy positions, divided by the
    moments response (measured on simulations, or configured). Returns (catalogue, calibration)."""
    img_for_stamps = np.where(bad_truth, 0.0, total)
    img_for_stamps[~np.isfinite(img_for_stamps)] = 0.0
    gal = ~truth["is_star"]
    stamps, _, sflags = extract_stamps(img_for_stamps, truth["x"][gal], truth["y"][gal], 32)
    if cfg.baseline_response is None:
        cal = measure_baseline_response(renderer, noise_model, cfg.n_calib, seed=cal_seed)
    else:
        cal = {"response": float(cfg.baseline_response), "configured": True}
    response = cal["response"]
    if not response > 0:
        raise ValueError(f"baseline response must be > 0, got {response}")
    inside = sflags == 0
    chi = np.full((int(gal.sum()), 2), np.nan)
    failed = np.ones(int(gal.sum()), dtype=bool)
    if inside.any():
        chi[inside], failed[inside] = MomentsEstimator().estimate(stamps[inside])
    gb = chi / response
    t_gal = truth[gal]
    keep = ~failed & np.isfinite(gb).all(axis=1) & ~np.asarray(t_gal["in_mask"])
    g_sky = pixel_to_sky_shear(gb[keep], wcs)  # published catalogues give sky-frame shears
    base = Table({"ID": np.asarray(t_gal["id"])[keep], "RA": np.asarray(t_gal["ra"])[keep],
                  "DEC": np.asarray(t_gal["dec"])[keep], "G1": g_sky[:, 0], "G2": g_sky[:, 1],
                  "MAG": np.asarray(t_gal["mag"])[keep]})
    base.meta["ESTIMAT"] = "moments"
    base.meta["FRAME"] = "sky: G1, G2 relative to east, north"
    base.meta["RESPONSE"] = response
    return base, cal


def _config_record(cfg: MockConfig, renderer) -> dict:
    """The mock's settings as plain values (the source as its name)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = renderer.source.name if f.name == "source" else list(v) if isinstance(v, tuple) else v
    return out


def _region(sl) -> list | None:
    return None if sl is None else [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]


def make_mock_field(cfg: MockConfig, out_dir: str | Path) -> dict:
    """Render a mock field and write every file (module docstring). Returns a summary dict with the
    file paths and counts (also written as ``{cluster}_mock.json``)."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.size < 64:
        raise ValueError(f"mock field size must be >= 64 px, got {cfg.size}")
    if cfg.masked_rect is not None and cfg.masked_filter not in list(cfg.filters):
        raise ValueError(f"masked_filter {cfg.masked_filter!r} is not one of the filters {list(cfg.filters)}")
    shape = (int(cfg.size), int(cfg.size))
    pos_seq, par_seq, noise_seq, star_seq, cal_seq = np.random.SeedSequence(cfg.seed).spawn(5)
    center = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0) if cfg.center is None else tuple(float(v) for v in cfg.center)
    lens = _Lens(cfg, center)
    n_gal, n_star = cfg.n_gal(), int(cfg.n_stars)
    xy = sample_positions(np.random.default_rng(pos_seq), n_gal + n_star, shape, cfg.min_sep_px, accept=lens.weak)
    gxy, sxy = xy[:n_gal], xy[n_gal:]

    renderer = build_renderer(cfg)
    params, lensing = _galaxy_params(cfg, renderer, lens, gxy, np.random.default_rng(par_seq))
    clean = np.zeros(shape, dtype=np.float64)
    rendered = _draw_galaxies(cfg, renderer, params, gxy, clean)
    star_mag = _draw_stars(cfg, renderer, sxy, clean, np.random.default_rng(star_seq))
    total, ivar_total, depth, noise_model = _add_noise(cfg, clean, np.random.default_rng(noise_seq))

    wcs = make_wcs(shape, cfg.ra0, cfg.dec0, cfg.pixel_scale, cfg.wcs_rotation_deg)
    paths, bad_truth = _write_filters(cfg, total, ivar_total, wcs, out_dir)
    truth = _truth_table(renderer, lens, gxy, sxy, params, lensing, star_mag, rendered, bad_truth, depth, wcs)
    truth_path = out_dir / f"{cfg.cluster}_truth.fits"
    truth.write(truth_path, overwrite=True)
    base, cal = _baseline_catalogue(cfg, renderer, noise_model, total, bad_truth, truth,
                                    int(cal_seq.generate_state(1)[0]), wcs)
    cat_path = out_dir / f"{cfg.cluster}_wl_catalogue.fits"
    base.write(cat_path, overwrite=True)

    sigma, nf = noise_model.sigma, len(cfg.filters)
    summary = {
        "cluster": cfg.cluster, "out_dir": str(out_dir), "shape": list(shape),
        "config": _config_record(cfg, renderer), "center": list(center),
        "truth": {"m200": cfg.m200, "conc": cfg.conc, "z_lens": cfg.z_lens, "z_source": cfg.z_source,
                  "center": list(center), "magnification": cfg.magnification},
        "n_galaxies": int(rendered.sum()), "n_render_failed": int((~rendered).sum()), "n_stars": n_star,
        "n_baseline": int(len(base)), "baseline_calibration": cal,
        "noise_sigma_pixel": sigma, "ivar_nominal": 1.0 / sigma**2, "weight_per_filter": 1.0 / sigma**2 / nf,
        "regions": {
            "shallow": _region(_rect_slices(cfg.shallow_rect, shape)),
            "masked": _region(_rect_slices(cfg.masked_rect, shape)),
            "nan": _region(_rect_slices(cfg.nan_rect, shape)),
            "region_format": "[x_start, y_start, x_stop, y_stop] pixels (stop exclusive)",
        },
        "files": {"sci": paths["sci"], "wht": paths["wht"], "truth": str(truth_path), "catalogue": str(cat_path)},
        "wall_time_s": time.time() - t0,
    }
    js = out_dir / f"{cfg.cluster}_mock.json"
    summary["files"]["summary"] = str(js)
    js.write_text(json.dumps(summary, indent=2, default=float))
    return summary
