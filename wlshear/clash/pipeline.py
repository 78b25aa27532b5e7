"""The cluster-field pipeline of the paper's section 6, one function per step.

Each step takes the previous steps' typed results (and its config section) and returns a small
dataclass; ``wlshear.tasks.infer_clash.process_cluster`` calls them in order:

1. :func:`load_cluster_field` -> :class:`FieldStep`: the n filters combined (``io.load_field``);
2. :func:`detect` -> :class:`Detections`: sources on the total image, matched to the baseline
   catalogue (its shears, when it has G1/G2);
3. :func:`select` -> :class:`Selection`: the cut flags (edge, bad pixels, ivar, stars, photometry,
   unmatched) and the star/galaxy diagnostic plot;
4. :func:`measure_shear` -> :class:`Shears`: 32x32 stamps of the selected sources, the CNN's
   shears (symmetrised), calibrated by the estimator's own calibration or by metacal responses
   (every shear divided by the field's mean response ``<R>``);
5. :func:`write_catalogue`: the shear catalogue FITS (flag bits in its header);
6. :func:`make_maps` -> :class:`Maps`: shear maps per scale with bootstrap errors (and the
   baseline's, with the covariance from the *same* resamples), FITS + whisker PNG;
7. :func:`estimate_errors` -> :class:`Errors`: hold-out per-galaxy errors, and both maps sampled at
   1/10 of the source density for the relative calibration (pooled over clusters by the task);
8. :func:`tangential_profile` -> :class:`Profile`: g_t and g_x around the centre, with the NFW model
   when the cluster gives its truth, CSV + PNG.

A step that finds the input unusable raises :class:`ClusterError` with what and how to fix it.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from wlshear.calibration.metacal import ensemble_response
from wlshear.clash import cuts as cutsmod
from wlshear.clash.detection import detect_sources, match_catalogue
from wlshear.clash.errors import holdout_sigma_source, relative_calibration, subsample_positions
from wlshear.clash.io import Field, load_field, read_catalogue
from wlshear.clash.lensing import nfw_gt_model, pixel_to_sky_shear, shear_profile, sky_to_pixel_shear, wcs_frame
from wlshear.clash.maps import (
    bootstrap_at,
    bootstrap_covariance,
    bootstrap_indices,
    bootstrap_maps,
    kernel_count_at,
    make_grid,
    shear_map,
    smooth_at,
    write_map_fits,
)
from wlshear.clash.stamps import extract_stamps
from wlshear.metrics.bias import calibrate, fit_bias
from wlshear.metrics.plots import plot_profile, plot_sigma_vs_scale, plot_star_galaxy, plot_whiskers
from wlshear.sim.constants import STAMP_SIZE
from wlshear.utils.plain import to_plain

log = logging.getLogger(__name__)

#: flag bit of a selected source whose stamp or CNN output is unusable (the cut bits: clash.cuts)
FLAG_CNN_FAILED = 64
FLAG_BITS = "1 edge 2 badpix 4 lowivar 8 star 16 phot 32 unmatch 64 cnnfail"
#: fewest galaxies for maps, errors and a baseline comparison
MIN_GALAXIES = 10


class ClusterError(ValueError):
    """A cluster's input is unusable (message says what and how to fix it)."""


def _plain(cfg):
    return to_plain(cfg, unknown=lambda o: o)


# ----------------------------------------------------------------------------- 1. the field


@dataclass
class FieldStep:
    field: Field
    summary: dict   # shape, filters, bad pixels, median ivar, warnings


def load_cluster_field(c: dict, io_cfg) -> FieldStep:
    """Read and combine the cluster's filters; UserWarnings (missing filters, ...) are recorded."""
    name = c["name"]
    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always", UserWarning)
        kw = {"pattern": c["pattern"]} if c.get("pattern") else {}
        field_ = load_field(c["dir"], name, c.get("filters"), min_weight=float(io_cfg.min_weight), **kw)
    summary = {"warnings": [str(w.message) for w in wlist if issubclass(w.category, UserWarning)]}
    if field_.missing_filters and io_cfg.get("require_all_filters", False):
        raise ClusterError(f"filters {field_.missing_filters} missing for {name} and io.require_all_filters is true")
    ny, nx = field_.shape
    summary.update({
        "shape": [ny, nx], "filters": field_.filters, "missing_filters": field_.missing_filters,
        "n_bad_pixels": int(field_.bad.sum()), "frac_bad_pixels": float(field_.bad.mean()),
        "median_ivar": float(np.median(field_.ivar[field_.ivar > 0])) if (field_.ivar > 0).any() else 0.0,
    })
    if field_.bad.all():
        raise ClusterError(f"every pixel of {name} is bad (weight < {io_cfg.min_weight} or NaN in some filter)")
    log.info("[%s] %dx%d px, %d filters, %.1f%% bad pixels", name, nx, ny, len(field_.filters), 100 * field_.bad.mean())
    return FieldStep(field_, summary)


# ----------------------------------------------------------------------------- 2. detection


@dataclass
class Detections:
    det: Table                       # one row per detection (clash.detection)
    matched: np.ndarray | None       # has a baseline-catalogue counterpart (None: no catalogue)
    cat_index: np.ndarray            # its row in the catalogue (-1: none)
    g_base: np.ndarray | None        # (N, 2) baseline shears of matched detections (NaN otherwise)
    info: dict                       # the baseline catalogue's summary


def _baseline_from_catalogue(path, det, radius: float, frame: str = "sky", wcs=None):
    """Read the baseline catalogue and match it; returns (matched, idx, g_base (N,2) or None, info).

    ``frame``: the frame of the catalogue's G1/G2: ``sky`` (east, north; the convention of published
    catalogues, converted to the pixel frame with the field's WCS, ``clash.lensing``) or ``pixel``
    (x = column, y = row of these images, used as they are)."""
    n = len(det)
    if not path:
        return None, np.full(n, -1), None, {"catalogue": None}
    if frame not in ("sky", "pixel"):
        raise ValueError(f"catalogue_frame must be 'sky' or 'pixel', got {frame!r}")
    cat = read_catalogue(path)  # FileNotFoundError / ValueError (no RA/Dec) -> cluster fails
    idx, sep, matched = match_catalogue(det, cat, radius)
    info = {"catalogue": str(path), "n_catalogue": len(cat), "n_matched": int(matched.sum()), "frame": frame,
            "median_sep_arcsec": float(np.median(sep[matched])) if matched.any() else None}
    g = None
    if "g1" in cat.colnames and "g2" in cat.colnames:
        g = np.full((n, 2), np.nan)
        gc = np.stack([np.asarray(cat["g1"], dtype=np.float64), np.asarray(cat["g2"], dtype=np.float64)], 1)
        if frame == "sky":
            if wcs is None:
                raise ValueError("a sky-frame baseline catalogue needs the field's WCS to be converted")
            gc = sky_to_pixel_shear(gc, wcs)  # ValueError for a skewed WCS: the cluster fails with it
            theta, flip = wcs_frame(wcs)
            info["wcs_rotation_deg"], info["wcs_parity_flip"] = float(np.degrees(theta)), flip
        g[matched] = gc[idx[matched]]
    else:
        info["baseline_note"] = f"catalogue has no G1/G2 columns ({cat.colnames}); no baseline comparison"
    return matched, idx, g, info


def detect(name: str, fld: FieldStep, det_cfg, catalogue=None, catalogue_frame: str = "sky") -> Detections:
    """Detect sources on the total image and match them to the baseline ``catalogue`` (a path) whose
    shears are in ``catalogue_frame`` (``sky`` or ``pixel``)."""
    f = fld.field
    det = detect_sources(f.image, f.ivar, f.bad, f.wcs, thresh=float(det_cfg.thresh), minarea=int(det_cfg.minarea),
                         deblend_nthresh=int(det_cfg.deblend_nthresh), deblend_cont=float(det_cfg.deblend_cont),
                         bkg_box=int(det_cfg.bkg_box), pixel_scale=f.pixel_scale)
    if len(det) == 0:
        raise ClusterError(f"no sources detected in {name}; check the images and detection.thresh")
    matched, cat_idx, g_base, info = _baseline_from_catalogue(catalogue, det, float(det_cfg.match_radius_arcsec),
                                                              catalogue_frame, f.wcs)
    return Detections(det, matched, cat_idx, g_base, info)


# ----------------------------------------------------------------------------- 3. cuts


@dataclass
class Selection:
    flags: np.ndarray    # (N,) int64 cut bits; 0 = selected
    summary: dict        # counts per cut and the star-locus parameters


def select(name: str, fld: FieldStep, dets: Detections, cuts_cfg, out: Path) -> Selection:
    """The selection cuts (``clash.cuts.apply_cuts``) and, with ``cuts.star_plot``, their diagnostic PNG."""
    f, det, matched = fld.field, dets.det, dets.matched
    flags, summary = cutsmod.apply_cuts(
        det, f.shape, f.bad, f.ivar, min_mean_ivar=float(cuts_cfg.min_mean_ivar),
        matched=matched if (matched is not None and cuts_cfg.get("require_match", True)) else None,
        star_kwargs=_plain(cuts_cfg.get("star")) or None,
    )
    if cuts_cfg.get("star_plot", True):
        plot_star_galaxy(det, (flags & cutsmod.CUT_STAR) != 0, out / f"{name}_star_galaxy.png", summary["star_params"],
                         title=f"{name}: star/galaxy separation")
    return Selection(flags, summary)


# ----------------------------------------------------------------------------- 4. stamps, shear, calibration


@dataclass
class Shears:
    g: np.ndarray              # (N, 2) calibrated CNN shears of every detection (NaN unless usable)
    flags: np.ndarray          # the cut flags plus FLAG_CNN_FAILED
    response: np.ndarray | None  # (N, 2, 2) metacal responses (None: simulation calibration)
    r_mean: np.ndarray | None  # the field's mean response <R> the shears were divided by
    shear_max: float | None = None  # the estimator's training prior |g1|, |g2| < shear_max (metadata)

    @property
    def use(self) -> np.ndarray:
        return self.flags == 0


def measure_shear(fld: FieldStep, dets: Detections, sel: Selection, estimator, cfg) -> Shears:
    """Stamps of the selected sources and the CNN's shears on them; with
    ``shear_calibration=metacal`` every usable shear is divided by the field's mean response
    (the cuts use the observed image's photometry, not counterfactuals: no selection response).
    Metacal stamps are ``stamp_size + 2 margin`` wide (``MetacalSettings.margin``)."""
    x = np.asarray(dets.det["x"], dtype=np.float64)
    y = np.asarray(dets.det["y"], dtype=np.float64)
    flags = sel.flags.copy()
    sel_idx = np.flatnonzero(flags == 0)
    g_cnn = np.full((len(x), 2), np.nan)
    metacal = str(cfg.get("shear_calibration", "simulation")) == "metacal"
    resp = np.full((len(x), 2, 2), np.nan)
    progress = bool(cfg.get("progress", True))
    # metacal stamps carry the operator's margin (the light just beyond the 32 x 32 box); a source
    # whose wider box leaves the image is flagged STAMP_EDGE like any edge source
    op = getattr(estimator, "metacal_operator", None) if metacal else None
    size = op.settings.input_size if op is not None else STAMP_SIZE
    if sel_idx.size:
        stamps, _, sflags = extract_stamps(fld.field.image, x[sel_idx], y[sel_idx], size)
        if metacal:
            mc = estimator.metacal(stamps, symmetrize=bool(cfg.symmetrize), batch_size=int(cfg.batch_size),
                                   seed=int(cfg.seed), progress=progress)
            g, failed = mc["g"], mc["failed"] | ~np.isfinite(mc["R"]).all(axis=(1, 2))
            resp[sel_idx] = mc["R"]
        else:
            g, failed = estimator.predict_with_flags(stamps, symmetrize=bool(cfg.symmetrize),
                                                     batch_size=int(cfg.batch_size), progress=progress)
        failed |= sflags != 0
        g_cnn[sel_idx] = np.where(failed[:, None], np.nan, g)
        flags[sel_idx[failed]] |= FLAG_CNN_FAILED
    use = flags == 0
    r_mean = None
    if metacal and use.any():
        r_mean = ensemble_response(resp[use])
        g_cnn[use] = g_cnn[use] @ np.linalg.inv(r_mean).T
    return Shears(g_cnn, flags, resp if metacal else None, r_mean, trained_shear_max(estimator))


def trained_shear_max(estimator) -> float | None:
    """The half-width of the uniform shear prior the estimator was trained on
    (``data.augment.shear_max`` in its metadata), or None when the file does not say."""
    cfg = (getattr(estimator, "metadata", None) or {}).get("config") or {}
    try:
        return float(cfg["data"]["augment"]["shear_max"])
    except (KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- 5. the catalogue


def write_catalogue(name: str, dets: Detections, shears: Shears, path: Path, wcs=None) -> Path:
    """The shear catalogue of every detection (``flags == 0``: the galaxies used downstream).

    ``g1, g2`` (and ``g1_base, g2_base``) are in the image pixel frame (x = column, y = row);
    with the field's ``wcs``, ``g1_sky, g2_sky`` (``g1_base_sky, g2_base_sky``) are the same shears
    in the sky frame (east, north; ``clash.lensing.pixel_to_sky_shear``). ``out_of_range``: a
    component beyond the estimator's training prior (``|g| > shear_max``, header SHEARMAX), where
    its response is not calibrated; flagged only (cutting on a measured shear would bias maps)."""
    det = dets.det
    catalogue = Table({
        "id": np.asarray(det["id"]), "ra": np.asarray(det["ra"]), "dec": np.asarray(det["dec"]),
        "x": np.asarray(det["x"], dtype=np.float64), "y": np.asarray(det["y"], dtype=np.float64),
        "g1": shears.g[:, 0], "g2": shears.g[:, 1], "flags": shears.flags,
        "mag": np.asarray(det["mag"]), "radius": np.asarray(det["flux_radius"]),
        "mu_max": np.asarray(det["mu_max"]), "flux": np.asarray(det["flux"]),
    })
    if dets.matched is not None:
        catalogue["matched"] = dets.matched
        catalogue["cat_index"] = np.where(dets.matched, dets.cat_index, -1)
    if dets.g_base is not None:
        catalogue["g1_base"] = dets.g_base[:, 0]
        catalogue["g2_base"] = dets.g_base[:, 1]
    if shears.shear_max is not None:
        # beyond the training prior the CNN's response bends (cluster cores): flagged, not cut, so
        # that no selection on the measured shear enters the maps
        with np.errstate(invalid="ignore"):
            catalogue["out_of_range"] = (np.abs(shears.g) > shears.shear_max).any(axis=1)
        catalogue.meta["SHEARMAX"] = shears.shear_max
    frame = None
    if wcs is not None:
        try:
            frame = wcs_frame(wcs)
        except ValueError as exc:  # a skewed WCS: pixel-frame shears only, and say why
            log.warning("[%s] no sky-frame shear columns: %s", name, exc)
            catalogue.meta["NOSKY"] = str(exc)[:60]
    if frame is not None:
        sky = pixel_to_sky_shear(shears.g, wcs)
        catalogue["g1_sky"], catalogue["g2_sky"] = sky[:, 0], sky[:, 1]
        if dets.g_base is not None:
            sky_b = pixel_to_sky_shear(dets.g_base, wcs)
            catalogue["g1_base_sky"], catalogue["g2_base_sky"] = sky_b[:, 0], sky_b[:, 1]
        catalogue.meta.update({"FRAME": "g1,g2: pixel (x=col, y=row); g*_sky: east, north",
                               "WCSROT": float(np.degrees(frame[0])), "WCSFLIP": bool(frame[1])})
    if shears.response is not None:
        for i in (0, 1):
            for j in (0, 1):
                catalogue[f"R{i + 1}{j + 1}"] = shears.response[:, i, j]
    catalogue.meta.update({"CLUSTER": name, "FLAGBITS": FLAG_BITS,
                           "CALIB": "metacal" if shears.response is not None else "simulation"})
    catalogue.write(path, overwrite=True)
    return path


# ----------------------------------------------------------------------------- 6. maps


@dataclass
class Maps:
    files: dict               # scale -> map FITS path
    whiskers: dict            # scale -> whisker PNG path
    scales: list[float]
    n_boot: int
    common: np.ndarray        # galaxies with both a CNN and a baseline shear
    has_base: bool            # a baseline comparison is made (>= MIN_GALAXIES common galaxies)
    idx_common: np.ndarray | None  # bootstrap resamples of the common galaxies (shared by CNN and baseline)
    note: str | None = None


def _map_set(name, fld, xy, g, grid, s, maps_cfg, n_boot, idx_use, base, out: Path) -> tuple[Path, Path]:
    """Maps at one scale: CNN (and baseline with covariance), FITS + whisker PNG."""
    f = fld.field
    (xu, yu), gu = xy, g
    maps, dens = shear_map(xu, yu, gu, grid, s, f.pixel_scale)
    sig = bootstrap_maps(xu, yu, gu, grid, s, index_sets=idx_use, pixel_scale=f.pixel_scale)
    # cells with fewer than maps.min_count kernel-weighted galaxies are masked (NaN in every map)
    min_count = float(maps_cfg.get("min_count", 0) or 0)
    masked = dens < min_count
    out_maps = {"G1": maps[0], "G2": maps[1], "SIGMA_G1": sig[0], "SIGMA_G2": sig[1], "DENSITY": dens,
                "MASK": masked.astype(np.uint8)}
    if base is not None:
        xc, yc, g_base, g_cnn, idx_common = base
        bmaps, _ = shear_map(xc, yc, g_base, grid, s, f.pixel_scale)
        bsig, bs = bootstrap_maps(xc, yc, g_base, grid, s, index_sets=idx_common, pixel_scale=f.pixel_scale,
                                  return_samples=True)
        _, cs = bootstrap_maps(xc, yc, g_cnn, grid, s, index_sets=idx_common, pixel_scale=f.pixel_scale,
                               return_samples=True)
        cov = bootstrap_covariance(cs, bs)
        out_maps.update({"BASE_G1": bmaps[0], "BASE_G2": bmaps[1], "SIGMA_BASE_G1": bsig[0],
                         "SIGMA_BASE_G2": bsig[1], "COV_G1": cov[0], "COV_G2": cov[1]})
    for key, arr in out_maps.items():
        if key not in ("DENSITY", "MASK"):
            out_maps[key] = np.where(masked, np.nan, arr)
    tag = f"{s:g}".replace(".", "p")
    n_gal = len(xu)
    mp = write_map_fits(out / f"{name}_maps_{tag}arcsec.fits", out_maps, grid, f.wcs,
                        meta={"LAMBDA": s, "CLUSTER": name, "NBOOT": n_boot, "NGAL": n_gal, "MINCOUNT": min_count,
                              "NMASKED": int(masked.sum())})
    wp = plot_whiskers(out_maps["G1"], out_maps["G2"], grid, out / f"{name}_whiskers_{tag}arcsec.png",
                       every=maps_cfg.get("whisker_every"), background=f.image,
                       title=f"{name}: CNN shear, lambda = {s:g}\" ({n_gal} galaxies)")
    return mp, wp


def make_maps(name: str, fld: FieldStep, dets: Detections, shears: Shears, maps_cfg, out: Path, rng,
              progress: bool = True) -> Maps:
    """Shear maps per scale (``maps.scales_arcsec``) with bootstrap errors; the bootstrap of the
    CNN and the baseline uses one set of resample indices on their common galaxies."""
    from tqdm.auto import tqdm

    scales = [float(s) for s in maps_cfg.scales_arcsec]
    if not scales:
        raise ValueError("maps.scales_arcsec is empty")
    n_boot = int(maps_cfg.n_boot)
    grid = make_grid(fld.field.shape, float(maps_cfg.cell_arcsec), fld.field.pixel_scale)
    x, y = np.asarray(dets.det["x"], dtype=np.float64), np.asarray(dets.det["y"], dtype=np.float64)
    use, g_base = shears.use, dets.g_base
    has_base = g_base is not None
    common = use & np.isfinite(g_base).all(axis=1) if has_base else np.zeros_like(use)
    note = None
    if has_base and common.sum() < MIN_GALAXIES:
        note = f"only {int(common.sum())} galaxies with both shears: no comparison"
        has_base = False
    ci = np.flatnonzero(common)
    idx_common = bootstrap_indices(ci.size, n_boot, rng) if has_base else None
    idx_use = bootstrap_indices(int(use.sum()), n_boot, rng)
    base = (x[ci], y[ci], g_base[ci], shears.g[ci], idx_common) if has_base else None
    files, whiskers = {}, {}
    for s in tqdm(scales, desc=f"[{name}] maps", disable=not progress):
        mp, wp = _map_set(name, fld, (x[use], y[use]), shears.g[use], grid, s, maps_cfg, n_boot, idx_use, base, out)
        files[str(s)], whiskers[str(s)] = str(mp), str(wp)
    return Maps(files, whiskers, scales, n_boot, common, has_base, idx_common, note)


# ----------------------------------------------------------------------------- 7. errors


@dataclass
class Errors:
    holdout: dict          # per-galaxy sigma_source (hold-out) of the CNN (and baseline, CNN on common)
    points: dict | None    # both maps sampled at 1/10 of the source density, with bootstrap (co)variances
    n_points: int | None
    calibration: dict | None   # this cluster's relative calibration fit (enough points)


def _holdout_summary(r: dict) -> dict:
    return {
        "sigma_source": [float(v) for v in r["sigma_source"]],
        "sigma_field_source": [float(v) for v in r["sigma_field_source"]],
        "sigma_field": [float(v) for v in r["sigma_field"]],
        "sigma_source_mean": float(np.sqrt(np.nanmean(np.asarray(r["sigma_source"]) ** 2))),
        "negative": [bool(v) for v in r["negative"]],
        "n_train": r["n_train"], "n_test": r["n_test"],
    }


def calibration_summary(fits_: list[dict]) -> dict:
    """Flat keys (m1, m1_err, c1, ..., chi2_1, ndof_1, n_1, success_1, ...) of a relative calibration."""
    out = {}
    for k, f in enumerate(fits_, start=1):
        for key in ("m", "m_err", "c", "c_err", "m_err_boot", "c_err_boot", "m_err_clusters", "c_err_clusters",
                    "chi2", "ndof", "n", "n_clusters", "success"):
            if key in f:  # m -> m1, m_err -> m1_err, chi2 -> chi2_1, ...
                name = f"{key[0]}{k}{key[1:]}" if key[0] in "mc" and key[1:2] in ("", "_") else f"{key}_{k}"
                out[name] = f[key]
    return out


def _calibration_positions(x, y, shape, s0, cal_cfg, min_count, rng, pixel_scale):
    """Where the two maps are compared: ``sample_fraction`` x the common galaxies' number of points,
    ``calibration.positions: uniform`` (default): uniform over the field (``shape`` = (ny, nx) px),
    keeping those with at least ``min_count`` kernel-weighted galaxies (at least 1 when 0), so
    dense regions are not over-represented; ``galaxies``: at randomly chosen galaxy positions."""
    fraction = float(cal_cfg.get("sample_fraction", 0.1))
    if str(cal_cfg.get("positions", "uniform")) == "galaxies":
        k = subsample_positions(x.size, fraction, rng)
        return x[k], y[k]
    n_q = max(1, int(round(fraction * x.size)))
    ny, nx = shape
    xq, yq = rng.uniform(-0.5, nx - 0.5, n_q), rng.uniform(-0.5, ny - 0.5, n_q)
    keep = kernel_count_at(x, y, xq, yq, s0, pixel_scale) >= max(float(min_count), 1.0)
    return xq[keep], yq[keep]


def _calibration_points(x, y, g_cnn, g_base, s0, maps: Maps, cal_cfg, rng, pixel_scale, shape=None,
                        min_count: float = 0.0) -> dict:
    """Both estimators' maps at the calibration positions (:func:`_calibration_positions`), with
    bootstrap variances and covariance from the same resamples (errors.relative_calibration's input)."""
    if shape is None:  # no field footprint known: galaxy positions
        cal_cfg = {**dict(cal_cfg), "positions": "galaxies"}
    xq, yq = _calibration_positions(x, y, shape, s0, cal_cfg, min_count, rng, pixel_scale)
    bb = bootstrap_at(x, y, g_base, xq, yq, s0, index_sets=maps.idx_common, pixel_scale=pixel_scale)
    bc = bootstrap_at(x, y, g_cnn, xq, yq, s0, index_sets=maps.idx_common, pixel_scale=pixel_scale)
    return {
        "ref": smooth_at(x, y, g_base, xq, yq, s0, pixel_scale), "est": smooth_at(x, y, g_cnn, xq, yq, s0, pixel_scale),
        "var_ref": np.nanvar(bb, axis=0, ddof=1), "var_est": np.nanvar(bc, axis=0, ddof=1),
        "cov": np.nanmean((bb - np.nanmean(bb, 0)) * (bc - np.nanmean(bc, 0)), axis=0) * bb.shape[0] / (bb.shape[0] - 1),
    }


def _holdout_at(x, y, g_cnn, g_base, use, common, s, n_boot, hf, split_seed, ps) -> dict:
    """Hold-out errors at one scale: the CNN on its galaxies and, with a baseline, the baseline and
    the CNN on the common galaxies (the same split seed everywhere)."""
    r = holdout_sigma_source(x[use], y[use], g_cnn[use], s, n_boot, hf, np.random.default_rng(split_seed), ps)
    out = {"cnn": _holdout_summary(r)}
    if g_base is not None:
        ci = np.flatnonzero(common)
        for key, gg in (("baseline", g_base[ci]), ("cnn_common", g_cnn[ci])):
            r = holdout_sigma_source(x[ci], y[ci], gg, s, n_boot, hf, np.random.default_rng(split_seed), ps)
            out[key] = _holdout_summary(r)
    return out


def recalibrated(g: np.ndarray, calibration: dict | None) -> np.ndarray | None:
    """CNN shears corrected by a relative calibration ``g_cal = (g - c) / (1 + m)`` per component
    (the fit of the CNN against the baseline, errors.relative_calibration); None without one."""
    if not calibration or any(f"{k}{i}" not in calibration for k in "mc" for i in (1, 2)):
        return None
    m = np.array([calibration["m1"], calibration["m2"]], dtype=np.float64)
    c = np.array([calibration["c1"], calibration["c2"]], dtype=np.float64)
    if not (np.all(np.isfinite(m)) and np.all(1 + m > 0)):
        return None
    return calibrate(g, m, c)


def estimate_errors(fld: FieldStep, dets: Detections, shears: Shears, maps: Maps, cfg, rng, out: Path | None = None,
                    name: str = "") -> Errors:
    """Hold-out per-galaxy errors (CNN; with a baseline also the baseline and the CNN on the common
    galaxies, same split) at the first map scale (``holdout``) and at every scale
    (``holdout["by_scale"]``, with a sigma-vs-lambda plot when ``out`` is given); the calibration
    points of this cluster and its relative calibration, which is then applied to the CNN shears
    and the hold-out repeated on them (``holdout["recalibrated"]``: the paper's order, both kept)."""
    s0, n_boot, hf, ps = maps.scales[0], maps.n_boot, float(cfg.holdout_fraction), fld.field.pixel_scale
    x, y = np.asarray(dets.det["x"], dtype=np.float64), np.asarray(dets.det["y"], dtype=np.float64)
    use = shears.use
    split_seed = int(rng.integers(2**31))
    g_base = dets.g_base if maps.has_base else None
    by_scale = {float(s): _holdout_at(x, y, shears.g, g_base, use, maps.common, float(s), n_boot, hf, split_seed, ps)
                for s in maps.scales}
    holdout = {"scale_arcsec": s0, "holdout_fraction": hf, **by_scale[float(s0)],
               "by_scale": {str(k): v for k, v in by_scale.items()}}
    if out is not None and len(by_scale) > 1:
        holdout["plot"] = str(plot_sigma_vs_scale(by_scale, out / f"{name}_sigma_vs_scale.png",
                                                  title=f"{name}: hold-out per-galaxy error"))
    if not maps.has_base:
        return Errors(holdout, None, None, None)
    ci = np.flatnonzero(maps.common)
    cal = cfg.calibration
    points = _calibration_points(x[ci], y[ci], shears.g[ci], dets.g_base[ci], s0, maps, cal, rng, ps,
                                 shape=fld.field.shape, min_count=float(cfg.maps.get("min_count", 0) or 0))
    n_points = len(points["ref"])
    calibration = None
    if n_points >= int(cal.min_points):
        try:
            fits_ = relative_calibration(points["ref"], points["est"], points["var_ref"], points["var_est"],
                                         points["cov"], n_boot=int(cal.n_boot), rng=rng)
            calibration = calibration_summary(fits_)
        except ValueError as exc:
            calibration = {"error": str(exc)}
    g_cal = recalibrated(shears.g, calibration)
    if g_cal is not None:
        holdout["recalibrated"] = _holdout_at(x, y, g_cal, None, use, maps.common, s0, n_boot, hf, split_seed, ps)["cnn"]
    return Errors(holdout, points, n_points, calibration)


# ----------------------------------------------------------------------------- 8. the profile


def load_truth(spec, redshift) -> dict | None:
    """NFW truth from a mock ``*_mock.json`` path or a dict {m200, conc, z_source[, z_lens, center]}."""
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ClusterError(f"truth file {path} does not exist (the mock writes <cluster>_mock.json)")
        spec = json.loads(path.read_text()).get("truth", {})
    spec = dict(spec)
    missing = [k for k in ("m200", "conc", "z_source") if k not in spec]
    if missing:
        raise ClusterError(f"truth {spec} lacks {missing}; need m200 [Msun], conc, z_source (z_lens = redshift)")
    spec.setdefault("z_lens", redshift)
    if spec["z_lens"] is None:
        raise ClusterError("truth needs z_lens or the cluster's redshift")
    return spec


def profile_center(c: dict, field_: Field, truth) -> tuple[float, float]:
    """The profile centre [px]: ``center``, ``center_radec``, the truth's centre, else the image centre."""
    ny, nx = field_.shape
    if c.get("center") is not None:
        xc, yc = (float(v) for v in c["center"])
    elif c.get("center_radec") is not None:
        ra, dec = (float(v) for v in c["center_radec"])
        xc, yc = (float(v) for v in field_.wcs.world_to_pixel_values(ra, dec))
    elif truth is not None and truth.get("center") is not None:
        xc, yc = (float(v) for v in truth["center"])
    else:
        xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    if not (np.isfinite(xc) and np.isfinite(yc)):
        raise ClusterError(f"cluster centre ({xc}, {yc}) is not finite")
    return xc, yc


@dataclass
class Profile:
    center: tuple[float, float]
    csv: Path
    png: Path


def _profile_table(prof, prof_b, truth, bins, min_per_bin: int) -> tuple[Table, tuple | None]:
    table = Table({"r_lo": prof["r_lo"], "r_hi": prof["r_hi"], "r_mean": prof["r_mean"], "n": prof["n"],
                   "gt_cnn": prof["gt"], "gt_err_cnn": prof["gt_err"], "gx_cnn": prof["gx"], "gx_err_cnn": prof["gx_err"]})
    for col in ("gt_cnn", "gt_err_cnn", "gx_cnn", "gx_err_cnn"):
        table[col][table["n"] < min_per_bin] = np.nan
    if prof_b is not None:
        table["n_base"] = prof_b["n"]
        for a, b in (("gt", "gt_base"), ("gt_err", "gt_err_base"), ("gx", "gx_base"), ("gx_err", "gx_err_base")):
            table[b] = np.where(prof_b["n"] >= min_per_bin, prof_b[a], np.nan)
    model = None
    if truth is not None:
        radius = np.where(np.isfinite(table["r_mean"]), table["r_mean"], 0.5 * (table["r_lo"] + table["r_hi"]))
        table["gt_nfw"] = nfw_gt_model(radius, truth)
        rm = np.geomspace(max(bins[0], 1.0), bins[-1], 100)
        model = (rm, nfw_gt_model(rm, truth))
    return table, model


def _as_profile(table: Table, suffix: str) -> Table:
    """``table`` with the columns of one estimator (``_cnn`` / ``_base``) as gt, gt_err, gx, gx_err."""
    out = table.copy()
    for col in ("gt", "gt_err", "gx", "gx_err"):
        out[col] = table[f"{col}{suffix}"]
    return out


def tangential_profile(name: str, c: dict, fld: FieldStep, dets: Detections, shears: Shears, maps: Maps, truth,
                       profile_cfg, out: Path) -> Profile:
    """g_t, g_x in annuli around the centre for the CNN (and the baseline), with the NFW model."""
    f = fld.field
    x, y = np.asarray(dets.det["x"], dtype=np.float64), np.asarray(dets.det["y"], dtype=np.float64)
    use = shears.use
    xc, yc = profile_center(c, f, truth)
    bins = np.asarray(profile_cfg.bins_arcsec, dtype=np.float64)
    prof = shear_profile(x[use], y[use], shears.g[use, 0], shears.g[use, 1], (xc, yc), bins, pixel_scale=f.pixel_scale)
    prof_b = None
    if maps.has_base:
        ci = np.flatnonzero(maps.common)
        prof_b = shear_profile(x[ci], y[ci], dets.g_base[ci, 0], dets.g_base[ci, 1], (xc, yc), bins,
                               pixel_scale=f.pixel_scale)
    table, model = _profile_table(prof, prof_b, truth, bins, int(profile_cfg.get("min_per_bin", 5)))
    csv = out / f"{name}_profile.csv"
    table.write(csv, format="ascii.csv", overwrite=True)
    png = out / f"{name}_profile.png"
    plot_profile(png, _as_profile(table, "_cnn"), _as_profile(table, "_base") if prof_b is not None else None, model,
                 f"{name}: tangential shear around ({xc:.0f}, {yc:.0f}) px")
    return Profile((xc, yc), csv, png)


# ----------------------------------------------------------------------------- truth (mock fields)

#: a detection is the truth galaxy nearest to it when closer than this [px]
TRUTH_MATCH_PX = 2.0


def truth_catalogue_path(c: dict) -> Path | None:
    """The per-galaxy truth table of a cluster entry: ``truth_catalogue``, or the ``files.truth`` of
    a mock's ``*_mock.json`` given as ``truth``; None for real clusters."""
    if c.get("truth_catalogue"):
        return Path(str(c["truth_catalogue"]))
    spec = c.get("truth")
    if isinstance(spec, (str, Path)) and Path(spec).is_file():
        files = json.loads(Path(spec).read_text()).get("files") or {}
        if files.get("truth"):
            return Path(files["truth"])
    return None


def truth_pairs(c: dict, dets: Detections, shears: Shears) -> dict | None:
    """True and estimated pixel-frame shears of the used galaxies matched to the truth table (within
    :data:`TRUTH_MATCH_PX`): ``{"g_true", "g_cnn", "g_base"}`` (N, 2) arrays (``g_base`` NaN where a
    galaxy has no baseline shear), or None without a truth table."""
    path = truth_catalogue_path(c)
    if path is None:
        return None
    if not path.is_file():
        raise ClusterError(f"truth catalogue {path} does not exist")
    from scipy.spatial import cKDTree

    truth = Table.read(path)
    gal = ~np.asarray(truth["is_star"], dtype=bool) if "is_star" in truth.colnames else np.ones(len(truth), bool)
    tx, ty = np.asarray(truth["x"], float)[gal], np.asarray(truth["y"], float)[gal]
    tg = np.c_[np.asarray(truth["g1"], float)[gal], np.asarray(truth["g2"], float)[gal]]
    use = np.flatnonzero(shears.use)
    x, y = np.asarray(dets.det["x"], float)[use], np.asarray(dets.det["y"], float)[use]
    d, i = cKDTree(np.c_[tx, ty]).query(np.c_[x, y])
    ok = d < TRUTH_MATCH_PX
    g_base = dets.g_base[use][ok] if dets.g_base is not None else np.full((int(ok.sum()), 2), np.nan)
    return {"g_true": tg[i[ok]], "g_cnn": shears.g[use][ok], "g_base": g_base}


def truth_bias(pairs: dict | None, shear_max: float | None = None) -> dict | None:
    """m, c (with errors) of the CNN and of the baseline against the true reduced shear of a mock
    (``g_est = (1 + m) g_true + c`` per component), from :func:`truth_pairs` (one cluster or pooled).

    With ``shear_max`` (the estimator's training prior), the same fits restricted to the galaxies
    whose true |g1| and |g2| lie inside it are added as ``within_prior`` (the CNN's response bends
    beyond its prior, a classical estimator's much less)."""
    if pairs is None or len(pairs["g_true"]) < 3:
        return None
    out = _truth_fits(pairs)
    if shear_max is not None:
        inside = (np.abs(pairs["g_true"]) < shear_max).all(axis=1)
        sub = _truth_fits({k: v[inside] for k, v in pairs.items()}) if inside.sum() >= 3 else {"n_matched": int(inside.sum())}
        out["within_prior"] = {"shear_max": float(shear_max), **sub}
    return out


def _truth_fits(pairs: dict) -> dict:
    out = {"n_matched": int(len(pairs["g_true"])), "cnn": fit_bias(pairs["g_true"], pairs["g_cnn"]).as_dict()}
    has_base = np.isfinite(pairs["g_base"]).all(axis=1)
    if has_base.sum() >= 3:
        out["baseline"] = fit_bias(pairs["g_true"][has_base], pairs["g_base"][has_base]).as_dict()
    return out
