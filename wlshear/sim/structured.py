"""A structured parametric galaxy population: bulge and disk with their own intrinsic shapes and
substructure that lies in the disk.

The embedded :class:`~wlshear.sim.sources.ParametricSource` gives every galaxy one intrinsic
ellipticity shared by all its components, so an image carries no information about the
galaxy's intrinsic shape beyond its overall ellipticity and every estimator meets the same
shape-noise floor. Real galaxies are not like that: a disk's axis ratio comes from its
inclination, a bulge is rounder than its disk and only roughly aligned with it, and knots and
spiral arms lie in the disk plane, so their pattern (circular before projection) is projected
and sheared with the disk. :class:`StructuredSource` draws such galaxies.

Every galaxy is described once, by :meth:`StructuredSource.components` (radial components and
point sources, the torch backend's fast path); :meth:`StructuredSource._build` turns that same
description into the GalSim profile, so the two backends draw one model.

Conventions: positions and sizes in arcsec unless a name says ``_px`` (target pixels, 0.065");
axis ratio q = b/a; ellipticities in the shear convention |g| = (1 - q) / (1 + q); position
angles in radians, counter-clockwise from the +x axis (image column); fluxes in counts at the
CLASH zero-point.

Distributions (defaults tuned to the COSMOS fits in ``../shared/data/cosmos_example_23.5`` and
``cosmos_sersic_300``; ``benchmarks/population.py`` plots the comparison):

- magnitude and half-light radius: as ``ParametricSource`` (the CLASH background population);
- morphology: with probability ``p_bulge_disk`` a de Vaucouleurs bulge plus an exponential
  disk, bulge-to-total U(``bulge_frac_range``), bulge / disk half-light radius log-normal
  (median ``bulge_hlr_ratio``, scatter ``bulge_hlr_log_scatter`` dex, clipped to
  ``bulge_hlr_ratio_range``); otherwise one Sersic profile, index drawn on ``sersic_grid`` with
  probabilities ``sersic_weights`` (the COSMOS single-Sersic histogram), treated as a disk when
  n <= ``disk_sersic_max`` and as a spheroid otherwise;
- disk shapes: a thick circular disk seen at inclination i, cos i ~ U(0, 1), intrinsic
  thickness q0 ~ N(``disk_thickness``, ``disk_thickness_sd``): q = sqrt(cos^2 i + q0^2 sin^2 i);
  position angle uniform;
- spheroid and bulge shapes: q ~ U(``spheroid_q_range``); a bulge's position angle is its disk's
  plus a normal offset of ``bulge_pa_sigma_deg`` degrees;
- substructure (disk-bearing galaxies, probability ``p_knots``): a fraction
  U(``knot_frac_range``) of the disk's flux in ``n_knots`` point sources placed in the disk
  plane with the disk's exponential radial profile, either on ``n_arms`` logarithmic spiral arms
  (probability ``p_arms``; pitch angle U(``arm_pitch_deg``), angular scatter ``arm_width`` rad)
  or as random clumps, then projected with the disk's own shape;
- every axis ratio is kept >= (1 - e_max) / (1 + e_max).
"""

from __future__ import annotations

import math

import galsim
import numpy as np

from wlshear.sim.constants import PIXEL_SCALE, ZP_CLASH
from wlshear.sim.sources import EXP_HLR_FACTOR, GalaxySource, draw_magnitudes_and_sizes, shear_matrix

#: COSMOS single-Sersic index histogram (cosmos_sersic_300, 276 galaxies) on the grid 0.5..4
COSMOS_SERSIC_WEIGHTS = (43, 91, 51, 26, 22, 18, 14, 11)


def axis_ratio_to_g(q) -> np.ndarray:
    """Shear-convention ellipticity modulus |g| = (1 - q) / (1 + q) of axis ratio ``q`` = b/a."""
    q = np.asarray(q, float)
    return (1 - q) / (1 + q)


def inclined_disk_q(cos_i, thickness) -> np.ndarray:
    """Projected axis ratio of a thick circular disk (intrinsic thickness q0 = ``thickness``) seen
    at inclination i (``cos_i`` = 1 face-on): sqrt(cos^2 i + q0^2 sin^2 i)."""
    c2 = np.asarray(cos_i, float) ** 2
    q0 = np.asarray(thickness, float)
    return np.sqrt(c2 + q0 * q0 * (1 - c2))


def _g_components(q, beta):
    g = axis_ratio_to_g(q)
    return g * np.cos(2 * beta), g * np.sin(2 * beta)


def _draw_shapes(rng, disky, thickness, thickness_sd, spheroid_q_range, bulge_pa_sigma_deg, q_min) -> dict:
    """Intrinsic shapes (shear convention) of the main profile (an inclined thick disk where
    ``disky``, else a spheroid) and of a bulge aligned with it to ``bulge_pa_sigma_deg``."""
    n = len(disky)
    q0 = np.clip(rng.normal(thickness, thickness_sd, n), 0.02, 0.9)
    q_disk = inclined_disk_q(rng.uniform(0, 1, n), q0)
    q_sph = rng.uniform(*spheroid_q_range, n)
    q_main = np.maximum(np.where(disky, q_disk, q_sph), q_min)
    beta = rng.uniform(0, np.pi, n)
    q_bulge = np.maximum(rng.uniform(*spheroid_q_range, n), q_min)
    beta_b = beta + np.radians(bulge_pa_sigma_deg) * rng.normal(0, 1, n)
    d1, d2 = _g_components(q_main, beta)
    b1, b2 = _g_components(q_bulge, beta_b)
    return {"disk_e1": d1, "disk_e2": d2, "bulge_e1": b1, "bulge_e2": b2}


def disk_plane_points(rng: np.random.Generator, n: int, arms: bool, n_arms: int, pitch: float,
                      width: float) -> np.ndarray:
    """``n`` points (n, 2) in the face-on disk plane in units of the disk's half-light radius,
    radii from the exponential disk's profile (r ~ Gamma(2) in scale radii). ``arms``: on
    ``n_arms`` logarithmic spirals of pitch angle ``pitch`` [rad], angles scattered by ``width``
    [rad]; else clumps at uniform angles."""
    r = rng.gamma(2.0, 1.0 / EXP_HLR_FACTOR, n)
    if arms:
        phase = rng.uniform(0, 2 * np.pi)
        arm = rng.integers(0, n_arms, n)
        theta = (phase + 2 * np.pi * arm / n_arms + np.log(np.maximum(r, 1e-3)) / math.tan(pitch)
                 + rng.normal(0.0, width, n))
    else:
        theta = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], -1)


class StructuredSource(GalaxySource):
    """Bulge + disk galaxies with their own intrinsic shapes and in-disk substructure (see the
    module docstring for every distribution; all set by ``conf/data/source/structured.yaml``).

    ``catalog`` holds, besides ``mag``, ``mag_source`` and ``hlr_px``: ``bulge_disk`` (bool),
    ``sersic_n`` (single-Sersic index, NaN for bulge+disk), ``disky`` (has a disk), ``bulge_frac``,
    ``bulge_hlr_ratio``, ``disk_e1/2`` and ``bulge_e1/2`` (shear-convention intrinsic shapes of the
    disk, or single profile, and of the bulge), ``knot_frac``, ``arms`` (bool), ``arm_pitch`` [rad].
    """

    name = "structured"

    def __init__(
        self,
        n_galaxies: int = 20000,
        seed: int = 12345,
        mag_mean: float = 24.5,
        mag_sd: float = 1.1,
        mag_range=(22.0, 27.0),
        hlr_median_px: float = 3.0,
        hlr_mag_slope: float = -0.15,
        hlr_log_scatter: float = 0.2,
        hlr_range_px=(1.0, 25.0),
        p_bulge_disk: float = 0.4,
        bulge_frac_range=(0.1, 0.8),
        bulge_hlr_ratio: float = 0.4,
        bulge_hlr_log_scatter: float = 0.2,
        bulge_hlr_ratio_range=(0.15, 1.0),
        sersic_grid=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0),
        sersic_weights=COSMOS_SERSIC_WEIGHTS,
        disk_sersic_max: float = 1.5,
        disk_thickness: float = 0.2,
        disk_thickness_sd: float = 0.05,
        spheroid_q_range=(0.5, 1.0),
        bulge_pa_sigma_deg: float = 30.0,
        p_knots: float = 0.5,
        knot_frac_range=(0.05, 0.3),
        n_knots: int = 25,
        p_arms: float = 0.5,
        n_arms: int = 2,
        arm_pitch_deg=(10.0, 30.0),
        arm_width: float = 0.25,
        e_max: float = 0.8,
        zeropoint: float = ZP_CLASH,
        pixel_scale: float = PIXEL_SCALE,
        gsparams=None,
        cache_size: int = 5000,
    ):
        super().__init__(gsparams, cache_size)
        if n_galaxies < 1:
            raise ValueError("n_galaxies must be >= 1")
        if not 1 <= n_knots <= 100:
            raise ValueError(f"n_knots must be in [1, 100], got {n_knots}")
        if len(sersic_weights) != len(sersic_grid) or min(sersic_weights) < 0 or sum(sersic_weights) <= 0:
            raise ValueError("sersic_weights needs one non-negative weight per sersic_grid value, not all 0")
        if not 0 < e_max < 1:
            raise ValueError(f"e_max must be in (0, 1), got {e_max}")
        self.seed, self.zeropoint, self.pixel_scale = int(seed), zeropoint, pixel_scale
        self.n_knots, self.n_arms, self.arm_width = int(n_knots), int(n_arms), float(arm_width)
        rng = np.random.default_rng(seed)
        n = int(n_galaxies)
        mag, hlr = draw_magnitudes_and_sizes(rng, n, mag_mean, mag_sd, mag_range, hlr_median_px, hlr_mag_slope,
                                             hlr_log_scatter, hlr_range_px)
        is_bd = rng.random(n) < p_bulge_disk
        w = np.asarray(sersic_weights, float)
        sersic_n = rng.choice(np.asarray(sersic_grid, float), n, p=w / w.sum())
        disky = is_bd | (sersic_n <= disk_sersic_max)
        shapes = _draw_shapes(rng, disky, disk_thickness, disk_thickness_sd, spheroid_q_range,
                              bulge_pa_sigma_deg, (1 - e_max) / (1 + e_max))
        ratio = np.clip(bulge_hlr_ratio * 10 ** rng.normal(0, bulge_hlr_log_scatter, n), *bulge_hlr_ratio_range)
        bulge_frac = rng.uniform(*bulge_frac_range, n)
        has_knots = disky & (rng.random(n) < p_knots)
        knot_frac = np.where(has_knots, rng.uniform(*knot_frac_range, n), 0.0)
        arms = has_knots & (rng.random(n) < p_arms)
        pitch = np.radians(rng.uniform(*arm_pitch_deg, n))
        self.catalog = {
            "mag": mag, "mag_source": mag.copy(), "hlr_px": hlr,
            "bulge_disk": is_bd, "sersic_n": np.where(is_bd, np.nan, sersic_n), "disky": disky,
            "bulge_frac": np.where(is_bd, bulge_frac, np.nan), "bulge_hlr_ratio": np.where(is_bd, ratio, np.nan),
            "disk_e1": shapes["disk_e1"], "disk_e2": shapes["disk_e2"],
            "bulge_e1": np.where(is_bd, shapes["bulge_e1"], np.nan), "bulge_e2": np.where(is_bd, shapes["bulge_e2"], np.nan),
            "knot_frac": knot_frac, "arms": arms, "arm_pitch": np.where(arms, pitch, np.nan),
        }

    def components(self, i: int) -> dict:
        """Galaxy ``i`` as radial components and point sources (the format of
        :meth:`wlshear.sim.sources.ParametricSource.components`: ``radial`` = [(kind, n, J [arcsec],
        flux)], ``knots_xy`` (M, 2) [arcsec], ``knots_w`` (M,) [counts]); :meth:`galaxy` is the
        same description as a GalSim profile."""
        c = self.catalog
        i = int(i)
        flux = 10 ** (-0.4 * (c["mag"][i] - self.zeropoint))
        hlr = c["hlr_px"][i] * self.pixel_scale
        s_main = shear_matrix(float(c["disk_e1"][i]), float(c["disk_e2"][i]))
        kf = float(c["knot_frac"][i])
        radial = []
        if c["bulge_disk"][i]:
            bf = float(c["bulge_frac"][i])
            s_b = shear_matrix(float(c["bulge_e1"][i]), float(c["bulge_e2"][i]))
            radial.append(("sersic", 4.0, s_b * (hlr * c["bulge_hlr_ratio"][i]), flux * bf))
            radial.append(("exp", 0.0, s_main * (hlr / EXP_HLR_FACTOR), flux * (1 - bf) * (1 - kf)))
            disk_flux = flux * (1 - bf)
        else:
            radial.append(("sersic", float(c["sersic_n"][i]), s_main * hlr, flux * (1 - kf)))
            disk_flux = flux
        if kf > 0:
            rng = np.random.default_rng([self.seed, 7_919, i])
            pts = disk_plane_points(rng, self.n_knots, bool(c["arms"][i]), self.n_arms,
                                    float(c["arm_pitch"][i]), self.arm_width)  # pitch: NaN (unused) for clumps
            knots_xy = pts @ (s_main * hlr).T
            knots_w = np.full(self.n_knots, disk_flux * kf / self.n_knots)
        else:
            knots_xy, knots_w = np.zeros((0, 2)), np.zeros(0)
        return {"radial": radial, "knots_xy": knots_xy, "knots_w": knots_w}

    def _build(self, i: int) -> galsim.GSObject:
        return profile_from_components(self.components(i), self.gsparams)


def profile_from_components(desc: dict, gsparams=None) -> galsim.GSObject:
    """The GalSim profile of a components description (radial components as unit profiles
    transformed by J and scaled to their flux; knots as point sources)."""
    parts = []
    for kind, n, jac, flux in desc["radial"]:
        if kind == "sersic":
            unit = galsim.Sersic(n=float(n), half_light_radius=1.0, gsparams=gsparams)
        elif kind == "exp":
            unit = galsim.Exponential(scale_radius=1.0, gsparams=gsparams)
        elif kind == "gauss":
            unit = galsim.Gaussian(sigma=1.0, gsparams=gsparams)
        else:
            raise ValueError(f"unknown radial component kind {kind!r}")
        j = np.asarray(jac, float)
        parts.append(unit.transform(j[0, 0], j[0, 1], j[1, 0], j[1, 1]).withFlux(float(flux)))
    for (x, y), w in zip(np.asarray(desc["knots_xy"], float).reshape(-1, 2), desc["knots_w"]):
        parts.append(galsim.DeltaFunction(flux=float(w), gsparams=gsparams).shift(float(x), float(y)))
    if not parts:
        raise ValueError("a galaxy description needs at least one component")
    return galsim.Add(parts, gsparams=gsparams) if len(parts) > 1 else parts[0]


#: COSMOS HST ACS pixel scale [arcsec] of the catalogue's Sersic / bulge+disk fit radii
COSMOS_FIT_PIXEL_SCALE = 0.03


def population_shapes(source: StructuredSource) -> dict:
    """The shape statistics of a structured source compared with the COSMOS fits by
    :func:`cosmos_fit_shapes` (same keys): ``sersic_n`` (single-Sersic galaxies), ``sersic_g``
    (their |g|), ``disk_q``, ``bulge_q``, ``bulge_frac``, ``bulge_hlr_ratio`` and ``dpa_deg``
    (|PA_bulge - PA_disk|, degrees) of bulge+disk galaxies."""
    c = source.catalog
    bd = np.asarray(c["bulge_disk"], bool)
    gd = np.hypot(c["disk_e1"], c["disk_e2"])
    gb = np.hypot(c["bulge_e1"], c["bulge_e2"])
    dpa = 0.5 * np.angle(np.exp(1j * (np.arctan2(c["bulge_e2"], c["bulge_e1"]) - np.arctan2(c["disk_e2"], c["disk_e1"]))))
    return {
        "sersic_n": c["sersic_n"][~bd], "sersic_g": gd[~bd],
        "disk_q": (1 - gd[bd]) / (1 + gd[bd]), "bulge_q": (1 - gb[bd]) / (1 + gb[bd]),
        "bulge_frac": c["bulge_frac"][bd], "bulge_hlr_ratio": c["bulge_hlr_ratio"][bd],
        "dpa_deg": np.degrees(np.abs(dpa[bd])),
    }


def cosmos_fit_shapes(fits_file, sersic_table=None) -> dict:
    """Shape statistics of the COSMOS parametric fits (the tuning data of the structured
    population; keys as :func:`population_shapes`).

    ``fits_file``: a GalSim ``real_galaxy_catalog_*_fits.fits`` (columns ``sersicfit``,
    ``bulgefit``, ``use_bulgefit``, ``fit_dvc_btt``; fit parameters in GalSim's layout: index 1
    half-light radius along the major axis [COSMOS pixels], 2 Sersic n, 3 axis ratio, 7 position
    angle; the bulge's at +8). Bulge+disk statistics from rows with ``use_bulgefit``.
    ``sersic_table``: optional text table of single-Sersic fits (columns ident, n, half-light
    radius [arcsec], |g|, position angle, ...: ``cosmos_sersic_300``), used for ``sersic_n`` and
    ``sersic_g`` instead of the catalogue's single-Sersic fits.
    """
    from pathlib import Path

    from astropy.table import Table

    path = Path(fits_file).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"COSMOS fits catalogue not found: {path}")
    tab = Table.read(path)
    missing = [c for c in ("sersicfit", "bulgefit", "use_bulgefit", "fit_dvc_btt") if c not in tab.colnames]
    if missing:
        raise ValueError(f"{path} is not a COSMOS fits catalogue: it lacks columns {missing}")
    sf, bf = np.asarray(tab["sersicfit"], float), np.asarray(tab["bulgefit"], float)
    use = np.asarray(tab["use_bulgefit"]).astype(bool)
    dq, bq = bf[use, 3], bf[use, 11]
    dh = np.sqrt(dq) * bf[use, 1]
    bh = np.sqrt(bq) * bf[use, 9]
    dpa = 0.5 * np.angle(np.exp(2j * (bf[use, 15] - bf[use, 7])))
    if sersic_table is not None:
        st = np.loadtxt(Path(sersic_table).expanduser(), ndmin=2)
        n_s, g_s = st[:, 1], st[:, 3]
    else:
        n_s, g_s = sf[:, 2], axis_ratio_to_g(sf[:, 3])
    return {
        "sersic_n": n_s, "sersic_g": g_s, "disk_q": dq, "bulge_q": bq,
        "bulge_frac": np.asarray(tab["fit_dvc_btt"], float)[use], "bulge_hlr_ratio": bh / dh,
        "dpa_deg": np.degrees(np.abs(dpa)),
    }
