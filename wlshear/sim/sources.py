"""Galaxy sources: where the unlensed galaxy profiles come from.

Every source is a finite catalogue of galaxies addressed by an integer id, with per-galaxy
properties (magnitude at the CLASH zero-point, half-light radius in target pixels) and a method
that builds the GalSim profile of one galaxy, centred, unsheared, unrotated, already rescaled to
the target frame. Profiles are built once per process and cached.

Units of the profiles' flux are "pre-mask counts": the renderer first draws the galaxy, then sets
pixels below ``mask_threshold`` to zero (COSMOS native noise), then multiplies by ``flux_factor``.
After that the pixel values are CLASH counts (zero-point 25.4193).

Where the mask acts (``mask_stage``): ``"image"`` (Springer et al.) thresholds every rendered,
lensed stamp; ``"source"`` thresholds the galaxy once, unlensed, at the same level of the same
rendered quantity, and then lenses the masked galaxy. Only ``"source"`` makes the stamp a
PSF-convolved *sheared* profile (``P * S_g[G]``), which is what a real sky image is and what
metacalibration assumes; the image-stage mask is a non-linear function of the shear (on noiseless
real COSMOS galaxies it biases metacal of moments by m = +0.05 in F814W 23-25; ``docs/METACAL.md``).

Sources
-------
``ParametricSource`` (``parametric``): the embedded default, needs no file. Sersic (index on a
    0.5 grid) or bulge + disk galaxies, optionally with RandomKnots substructure; properties drawn
    from configurable distributions that resemble the CLASH background population.
``CosmosSource`` (``cosmos`` / ``cosmos_parametric``): HST COSMOS F814W galaxies from a GalSim
    COSMOS catalogue directory, real images rendered by reconvolution or their parametric fits.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import galsim
import numpy as np

from wlshear.sim.constants import (
    ALPHA_RESCALE,
    COSMOS_FLUX_FACTOR,
    COSMOS_MASK_THRESHOLD,
    COSMOS_PIXEL_SCALE,
    PIXEL_SCALE,
    PSF_FWHM,
    STAMP_SIZE,
    ZP_CLASH,
    ZP_COSMOS,
)
from wlshear.sim.psf import make_psf


def make_gsparams(gsparams) -> galsim.GSParams | None:
    """Build GSParams from a dict (config) or pass through a GSParams/None."""
    if gsparams is None or isinstance(gsparams, galsim.GSParams):
        return gsparams
    return galsim.GSParams(**dict(gsparams))


class _LRU:
    """Small least-recently-used cache of built GalSim objects."""

    def __init__(self, maxsize: int):
        self.maxsize = int(maxsize)
        self._d: OrderedDict = OrderedDict()

    def get(self, key, factory):
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        val = factory()
        self._d[key] = val
        if len(self._d) > self.maxsize:
            self._d.popitem(last=False)
        return val

    def __getstate__(self):  # caches are per process: never pickle built objects
        return {"maxsize": self.maxsize}

    def __setstate__(self, state):
        self.maxsize = state["maxsize"]
        self._d = OrderedDict()


class GalaxySource:
    """Base class: a finite catalogue of galaxies with a profile builder.

    Attributes
    ----------
    name : str
    catalog : dict of numpy arrays, each of length ``len(self)``:
        ``mag`` (total magnitude at the CLASH zero-point, after all rescaling),
        ``mag_source`` (magnitude in the source catalogue's own system; used for the training
        magnitude bins), ``hlr_px`` (half-light radius in target pixels, before PSF).
    mask_threshold : float or None
        Pixels of the drawn galaxy below this value [pre-mask counts] are set to 0.
    mask_stage : ``"image"`` (the renderer masks each lensed stamp) or ``"source"`` (the source
        masks the unlensed galaxy; the renderer does not mask).
    flux_factor : float
        Multiplies the stamp after masking.
    """

    name = "base"
    mask_threshold: float | None = None
    mask_stage: str = "image"
    flux_factor: float = 1.0

    @property
    def image_mask_threshold(self) -> float | None:
        """The threshold the renderer applies to each rendered stamp (None: no image mask)."""
        return self.mask_threshold if self.mask_stage == "image" else None

    def __init__(self, gsparams=None, cache_size: int = 5000):
        self.gsparams = make_gsparams(gsparams)
        self._cache = _LRU(cache_size)
        self.catalog: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.catalog["mag"])

    def input_files(self) -> list[Path]:
        """Every file this source reads (cache keys cover their content); none for built-in sources."""
        return []

    def galaxy(self, index: int) -> galsim.GSObject:
        """The galaxy profile for ``index`` (cached)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"galaxy id {index} out of range for {self.name} source with {len(self)} galaxies")
        return self._cache.get(index, lambda: self._build(index))

    def _build(self, index: int) -> galsim.GSObject:  # pragma: no cover - abstract
        raise NotImplementedError


def _truncnorm(rng, n, mean, sd, lo, hi):
    out = rng.normal(mean, sd, n)
    bad = (out < lo) | (out > hi)
    while bad.any():
        out[bad] = rng.normal(mean, sd, bad.sum())
        bad = (out < lo) | (out > hi)
    return out


def draw_magnitudes_and_sizes(rng, n, mag_mean, mag_sd, mag_range, hlr_median_px, hlr_mag_slope, hlr_log_scatter,
                              hlr_range_px) -> tuple[np.ndarray, np.ndarray]:
    """The parametric populations' magnitudes (CLASH zero-point) and half-light radii [target
    pixels]: mag ~ normal(``mag_mean``, ``mag_sd``) truncated to ``mag_range``; log10 r =
    log10(``hlr_median_px``) + ``hlr_mag_slope`` (mag - ``mag_mean``) + normal(0, ``hlr_log_scatter``),
    clipped to ``hlr_range_px``. Draws in that order from ``rng``."""
    mag = _truncnorm(rng, n, mag_mean, mag_sd, *mag_range)
    logr = math.log10(hlr_median_px) + hlr_mag_slope * (mag - mag_mean) + rng.normal(0.0, hlr_log_scatter, n)
    return mag, np.clip(10**logr, *hlr_range_px)


class ParametricSource(GalaxySource):
    """Analytic galaxy population resembling the CLASH background sources (the embedded default).

    All distributions are set by the constructor (and so by ``conf/data/source/parametric.yaml``):

    - magnitude (CLASH zero-point): normal(``mag_mean``, ``mag_sd``) truncated to ``mag_range``;
    - half-light radius [target pixels, 0.065"]: log10 r = log10(``hlr_median_px``)
      + ``hlr_mag_slope`` * (mag - ``mag_mean``) + normal(0, ``hlr_log_scatter``), clipped to
      ``hlr_range_px`` (brighter galaxies are larger for a negative slope);
    - morphology: with probability ``p_bulge_disk`` a de Vaucouleurs bulge (half-light radius
      ``bulge_hlr_ratio`` x disk's) plus exponential disk, bulge fraction U(``bulge_frac_range``);
      otherwise a single Sersic profile with index uniform on ``sersic_grid`` (a grid of 0.5
      steps keeps GalSim's Sersic tables cached; continuous n is ~10x slower);
    - substructure: with probability ``p_knots`` a fraction U(``knot_frac_range``) of the
      (disk) flux is moved into ``galsim.RandomKnots`` with ``n_knots`` points (<= 25);
    - intrinsic ellipticity: |e| (shear convention) from a Rayleigh distribution of scale
      ``e_sigma`` truncated at ``e_max``; random position angle.
    """

    name = "parametric"

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
        bulge_hlr_ratio: float = 0.5,
        bulge_frac_range=(0.05, 0.6),
        sersic_grid=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0),
        p_knots: float = 0.15,
        knot_frac_range=(0.05, 0.3),
        n_knots: int = 25,
        e_sigma: float = 0.25,
        e_max: float = 0.8,
        zeropoint: float = ZP_CLASH,
        pixel_scale: float = PIXEL_SCALE,
        gsparams=None,
        cache_size: int = 5000,
    ):
        super().__init__(gsparams, cache_size)
        if not 1 <= n_knots <= 25:
            raise ValueError(f"n_knots must be in [1, 25], got {n_knots}")
        if n_galaxies < 1:
            raise ValueError("n_galaxies must be >= 1")
        self.seed = seed
        self.zeropoint = zeropoint
        self.pixel_scale = pixel_scale
        self.bulge_hlr_ratio = bulge_hlr_ratio
        self.n_knots = int(n_knots)
        rng = np.random.default_rng(seed)
        n = int(n_galaxies)
        mag, hlr = draw_magnitudes_and_sizes(rng, n, mag_mean, mag_sd, mag_range, hlr_median_px, hlr_mag_slope,
                                             hlr_log_scatter, hlr_range_px)
        is_bd = rng.random(n) < p_bulge_disk
        sersic_n = rng.choice(np.asarray(sersic_grid, dtype=float), n)
        bulge_frac = rng.uniform(*bulge_frac_range, n)
        has_knots = rng.random(n) < p_knots
        knot_frac = np.where(has_knots, rng.uniform(*knot_frac_range, n), 0.0)
        emag = rng.rayleigh(e_sigma, n)
        while (bad := emag >= e_max).any():
            emag[bad] = rng.rayleigh(e_sigma, bad.sum())
        beta = rng.uniform(0, np.pi, n)
        self.catalog = {
            "mag": mag,
            "mag_source": mag.copy(),
            "hlr_px": hlr,
            "bulge_disk": is_bd,
            "sersic_n": np.where(is_bd, np.nan, sersic_n),
            "bulge_frac": np.where(is_bd, bulge_frac, np.nan),
            "knot_frac": knot_frac,
            "e1": emag * np.cos(2 * beta),
            "e2": emag * np.sin(2 * beta),
        }

    def _build(self, i: int) -> galsim.GSObject:
        c = self.catalog
        flux = 10 ** (-0.4 * (c["mag"][i] - self.zeropoint))
        hlr = c["hlr_px"][i] * self.pixel_scale  # arcsec
        gsp = self.gsparams
        kf = c["knot_frac"][i]
        if c["bulge_disk"][i]:
            bf = c["bulge_frac"][i]
            bulge = galsim.DeVaucouleurs(half_light_radius=hlr * self.bulge_hlr_ratio, gsparams=gsp)
            disk = galsim.Exponential(half_light_radius=hlr, gsparams=gsp)
            parts = [bulge.withFlux(bf)]
            disk_flux = 1.0 - bf
        else:
            disk = galsim.Sersic(n=float(c["sersic_n"][i]), half_light_radius=hlr, gsparams=gsp)
            parts = []
            disk_flux = 1.0
        parts.append(disk.withFlux(disk_flux * (1 - kf)))
        if kf > 0:
            rng = galsim.BaseDeviate(int(self.seed) * 1_000_003 + i + 1)
            knots = galsim.RandomKnots(
                self.n_knots, half_light_radius=hlr, flux=disk_flux * kf, rng=rng, gsparams=gsp
            )
            parts.append(knots)
        gal = galsim.Add(parts, gsparams=gsp) if len(parts) > 1 else parts[0]
        gal = gal.shear(g1=float(c["e1"][i]), g2=float(c["e2"][i]))
        return gal.withFlux(flux)

    def components(self, i: int) -> dict:
        """Galaxy ``i`` (the profile :meth:`galaxy` builds) as radial components and point sources,
        without building a GalSim object: the torch backend's fast path (checked against the
        decomposition of :meth:`galaxy` in tests/test_torch_render.py).

        Returns ``{"radial": [(kind, n, J, flux), ...], "knots_xy": (M, 2), "knots_w": (M,)}``.
        A radial component's surface brightness is ``flux x I_unit(|J^-1 x|) / |det J|`` with
        ``I_unit`` the unit-flux profile of ``kind`` ('sersic' of index ``n`` with half-light radius
        1, or 'exp' with scale radius 1) and ``J`` (2, 2) [arcsec] its size times the intrinsic
        shear matrix; knots are point sources at ``knots_xy`` [arcsec] with fluxes ``knots_w``.
        Fluxes in counts (CLASH zero-point).
        """
        c = self.catalog
        flux = 10 ** (-0.4 * (c["mag"][i] - self.zeropoint))
        hlr = c["hlr_px"][i] * self.pixel_scale  # arcsec
        shear = shear_matrix(float(c["e1"][i]), float(c["e2"][i]))
        kf = c["knot_frac"][i]
        radial = []
        if c["bulge_disk"][i]:
            bf = c["bulge_frac"][i]
            radial.append(("sersic", 4.0, shear * (hlr * self.bulge_hlr_ratio), flux * bf))
            radial.append(("exp", 0.0, shear * (hlr / EXP_HLR_FACTOR), flux * (1 - bf) * (1 - kf)))
            disk_flux = 1.0 - bf
        else:
            radial.append(("sersic", float(c["sersic_n"][i]), shear * hlr, flux * (1 - kf)))
            disk_flux = 1.0
        if kf > 0:
            rng = galsim.BaseDeviate(int(self.seed) * 1_000_003 + i + 1)
            pts = np.asarray(galsim.RandomKnots(self.n_knots, half_light_radius=hlr, flux=1.0, rng=rng).points,
                             float).reshape(-1, 2)
            knots_xy, knots_w = pts @ shear.T, np.full(len(pts), flux * disk_flux * kf / len(pts))
        else:
            knots_xy, knots_w = np.zeros((0, 2)), np.zeros(0)
        return {"radial": radial, "knots_xy": knots_xy, "knots_w": knots_w}


#: half-light radius / scale radius of an exponential profile (GalSim's value)
EXP_HLR_FACTOR = 1.6783469900166605


def shear_matrix(g1: float, g2: float) -> np.ndarray:
    """(2, 2) area-preserving matrix of a reduced shear (g1, g2), as ``galsim.Shear(g1=, g2=).getMatrix()``."""
    g2sq = g1 * g1 + g2 * g2
    if not g2sq < 1:
        raise ValueError(f"|g| must be < 1, got ({g1}, {g2})")
    return np.array([[1 + g1, g2], [g2, 1 - g1]]) / math.sqrt(1 - g2sq)


DOWNLOAD_HINT = (
    "Download a COSMOS training sample with GalSim's script, e.g. "
    "`galsim_download_cosmos -s 25.2 -d {dir}` (or -s 23.5), then point "
    "data.source.catalog_dir at the directory holding real_galaxy_catalog_*.fits."
)


def _find_catalog_file(directory: Path, file_name: str | None) -> Path:
    if file_name is not None:
        return directory / file_name
    cands = sorted(
        p
        for p in directory.glob("real_galaxy_catalog_*.fits")
        if not p.name.endswith(("_fits.fits", "_selection.fits"))
    )
    if not cands:
        raise FileNotFoundError(
            f"No COSMOS catalogue (real_galaxy_catalog_*.fits) in {directory}. "
            + DOWNLOAD_HINT.format(dir=directory.parent)
        )
    return cands[0]


FITS_BLOCK = 2880  # every complete FITS file is a whole number of 2880-byte blocks
_FULL_CHECK_BYTES = 64 * 2**20  # files up to this size have every HDU header walked


def fits_problem(path) -> str | None:
    """Why the FITS file ``path`` is truncated or unreadable, or None if it looks complete.

    Files up to 64 MiB have every HDU header read and the end of the last data unit compared with
    the file size (exact); larger files (the COSMOS image files) are checked for a size that is a
    whole number of 2880-byte FITS blocks and a readable first header (cheap, catches almost every
    interrupted download).
    """
    from astropy.io import fits

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if size % FITS_BLOCK:
        return f"its size {size} bytes is not a whole number of {FITS_BLOCK}-byte FITS blocks (truncated)"
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's truncation warning: we measure it ourselves
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                if size > _FULL_CHECK_BYTES:
                    hdul[0].header  # noqa: B018 - the first header must parse
                    return None
                end = 0
                for hdu in hdul:
                    info = hdu.fileinfo()
                    end = max(end, info["datLoc"] + info["datSpan"])
    except Exception as err:  # astropy raises OSError, ValueError, TypeError, ... on broken files
        return f"it is not a readable FITS file ({type(err).__name__}: {err})"
    if end > size:
        return f"its headers need {end} bytes but it has {size} (truncated)"
    return None


def check_cosmos_dir(catalog_dir, file_name=None, use_real=True, exclusion_level="none") -> Path:
    """Check that a GalSim COSMOS catalogue directory has every file the chosen mode needs, and
    that none of them is truncated (:func:`fits_problem`).

    Raises one FileNotFoundError listing all missing files and how to download them, or a
    ValueError naming every truncated / unreadable file. Returns the catalogue file path.
    """
    return _cosmos_files(catalog_dir, file_name, use_real, exclusion_level)[0]


def _cosmos_files(catalog_dir, file_name=None, use_real=True, exclusion_level="none") -> list[Path]:
    """[catalogue, its companions and (use_real) image / PSF / noise files], checked as in
    :func:`check_cosmos_dir`."""
    directory = Path(catalog_dir).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"COSMOS catalogue directory does not exist: {directory}. " + DOWNLOAD_HINT.format(dir=directory.parent)
        )
    cat_path = _find_catalog_file(directory, file_name)
    missing = []
    names: set[str] = set()
    if not cat_path.exists():
        missing.append(cat_path.name)
    else:
        from astropy.io import fits

        why = fits_problem(cat_path)
        if why:
            raise ValueError(f"COSMOS catalogue {cat_path} is unusable: {why}. Re-download it. "
                             + DOWNLOAD_HINT.format(dir=directory.parent))
        try:
            with fits.open(cat_path) as hdul:
                cols = hdul[1].columns.names
                data = hdul[1].data
                if use_real:
                    for col in ("GAL_FILENAME", "PSF_FILENAME", "NOISE_FILENAME"):
                        if col in cols:
                            names.update(str(v).strip() for v in np.unique(data[col]))
                    missing.extend(sorted(n for n in names if n and not (directory / n).exists()))
        except OSError as err:
            raise OSError(f"COSMOS catalogue {cat_path} is not a readable FITS table: {err}") from err
    stem = cat_path.name[: -len(".fits")]
    fits_file = directory / f"{stem}_fits.fits"
    if not fits_file.exists():
        missing.append(fits_file.name)
    if exclusion_level not in (None, "none"):
        sel = directory / f"{stem}_selection.fits"
        if not sel.exists():
            missing.append(sel.name + f" (needed for exclusion_level={exclusion_level!r}; use 'none' to skip)")
    if missing:
        raise FileNotFoundError(
            f"COSMOS catalogue directory {directory} is incomplete; missing: {', '.join(missing)}. "
            + DOWNLOAD_HINT.format(dir=directory.parent)
        )
    files = [cat_path, fits_file]
    if exclusion_level not in (None, "none"):
        files.append(directory / f"{stem}_selection.fits")
    files += [directory / n for n in sorted(names) if n]
    broken = [f"{f.name}: {why}" for f in files[1:] if (why := fits_problem(f))]
    if broken:
        raise ValueError(f"COSMOS catalogue directory {directory} has truncated or unreadable files ("
                         + "; ".join(broken) + "). Re-download them. " + DOWNLOAD_HINT.format(dir=directory.parent))
    return files


class CosmosSource(GalaxySource):
    """HST COSMOS F814W galaxies from a GalSim COSMOS catalogue directory.

    ``use_real=True`` renders the real images by reconvolution (GalSim RealGalaxy: the HST PSF is
    deconvolved, the galaxy lensed and reconvolved with the target PSF). ``use_real=False`` uses the
    catalogue's Sersic / bulge+disk fits. Both are rescaled as in Springer et al.: dilated by
    ``alpha`` (0.5416667) with flux rescaled by alpha^2 (constant surface brightness), pixels below
    ``mask_threshold`` (0.012; removes the native COSMOS noise) set to 0 after drawing, then
    multiplied by ``flux_factor`` (0.3203), which puts the stamp in CLASH counts.

    ``mask_stage="source"`` masks the galaxy before lensing instead: the unlensed galaxy is drawn
    convolved with the target PSF (FWHM ``psf_fwhm`` [arcsec]) and the target pixel on the fine
    grid of the source image (0.03" x alpha = 1/4 target pixel), the source-image pixels where
    that (the value a target pixel centred there would read) is below ``mask_threshold`` are set
    to 0, and the masked image is reconvolved as usual. Same threshold, same quantity, same region
    for the unlensed galaxy; the lensed stamp is then exactly the sheared masked galaxy.

    Parameters
    ----------
    catalog_dir : directory holding ``real_galaxy_catalog_*.fits`` and its companions.
    file_name : catalogue file name (default: the first ``real_galaxy_catalog_*.fits``).
    exclusion_level : GalSim COSMOSCatalog exclusion level ('none', 'bad_stamp', 'bad_fits',
        'marginal'); anything but 'none' needs the ``_selection.fits`` file.
    mag_range : optional (lo, hi) cut on the source (F814W) magnitude.
    mask_stage : ``"image"`` (paper) or ``"source"`` (see above).
    psf_fwhm : target PSF FWHM [arcsec], for the source-stage mask.
    """

    def __init__(
        self,
        catalog_dir,
        file_name: str | None = None,
        use_real: bool = True,
        exclusion_level: str = "none",
        alpha: float = ALPHA_RESCALE,
        mask_threshold: float | None = COSMOS_MASK_THRESHOLD,
        flux_factor: float = COSMOS_FLUX_FACTOR,
        mag_range=None,
        source_pixel_scale: float = COSMOS_PIXEL_SCALE,
        pixel_scale: float = PIXEL_SCALE,
        zp_source: float = ZP_COSMOS,
        zp_target: float = ZP_CLASH,
        gsparams=None,
        cache_size: int = 2000,
        mask_stage: str = "image",
        psf_fwhm: float = PSF_FWHM,
    ):
        super().__init__(gsparams, cache_size)
        if mask_stage not in ("image", "source"):
            raise ValueError(f"mask_stage must be 'image' or 'source', got {mask_stage!r}")
        self.mask_stage = mask_stage
        self.psf_fwhm = float(psf_fwhm)
        self.pixel_scale = float(pixel_scale)
        self.name = "cosmos" if use_real else "cosmos_parametric"
        self._files = _cosmos_files(catalog_dir, file_name, use_real, exclusion_level)
        cat_path = self._files[0]
        self.catalog_path = cat_path
        self.use_real = bool(use_real)
        self.alpha = float(alpha)
        self.mask_threshold = mask_threshold
        self.flux_factor = float(flux_factor)
        self.exclusion_level = exclusion_level
        self._open()
        pc = self._cosmos.param_cat
        names = pc.dtype.names
        orig = np.asarray(self._cosmos.orig_index)
        if "mag_auto" in names:
            mag_src = np.asarray(pc["mag_auto"], dtype=float)[orig]
        else:
            rc = self._cosmos.real_cat
            if rc is None or not hasattr(rc, "cat") or "MAG" not in rc.cat.columns.names:
                raise ValueError(f"{cat_path}: no magnitude column (mag_auto in the fits file or MAG in the catalogue)")
            mag_src = np.asarray(rc.cat["MAG"], dtype=float)[orig]
        if "flux_radius" not in names:
            raise ValueError(f"{cat_path}: the _fits.fits file has no flux_radius column")
        # flux_radius is in COSMOS pixels; target pixels = r * 0.03 * alpha / 0.065 (= r / 4).
        hlr_px = np.asarray(pc["flux_radius"], dtype=float)[orig] * source_pixel_scale * self.alpha / pixel_scale
        shift = -2.5 * np.log10(self.alpha**2 * self.flux_factor) - (zp_source - zp_target)
        keep = np.ones(len(orig), bool)
        if mag_range is not None:
            keep = (mag_src >= mag_range[0]) & (mag_src <= mag_range[1])
        if not keep.any():
            raise ValueError(f"no COSMOS galaxy in {cat_path} passes mag_range={mag_range}")
        self._index = np.nonzero(keep)[0]  # our id -> COSMOSCatalog index
        self.catalog = {
            "mag": (mag_src + shift)[keep],
            "mag_source": mag_src[keep],
            "hlr_px": hlr_px[keep],
            "cosmos_ident": np.asarray(pc["IDENT"])[orig][keep] if "IDENT" in names else self._index,
        }

    def input_files(self) -> list[Path]:
        """Catalogue, fits, selection and (real galaxies) image, PSF and noise files."""
        return list(self._files)

    def _open(self):
        self._cosmos = galsim.COSMOSCatalog(
            file_name=self.catalog_path.name,
            dir=str(self.catalog_path.parent),
            use_real=self.use_real,
            exclusion_level=self.exclusion_level,
        )

    def __getstate__(self):
        st = self.__dict__.copy()
        st["_cosmos"] = None  # re-opened lazily in each worker process
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)

    def _build(self, i: int) -> galsim.GSObject:
        if self._cosmos is None:
            self._open()
        k = int(self._index[i])
        source_mask = self.mask_stage == "source" and self.mask_threshold is not None
        if self.use_real:
            rc = self._cosmos.real_cat
            index = int(self._cosmos.orig_index[k])
            gal = galsim.RealGalaxy(rc, index=index, flux_rescale=self.alpha**2, gsparams=self.gsparams)
            if source_mask:
                gal = self._source_masked_real(gal, rc, index)
        else:
            gal = self._cosmos.makeGalaxy(k, gal_type="parametric", gsparams=self.gsparams) * self.alpha**2
            if source_mask:
                gal = self._source_masked_profile(gal)
        return gal.dilate(self.alpha)

    def _mask_reference(self, gal: galsim.GSObject, shape: tuple[int, int], scale: float) -> np.ndarray:
        """What a target pixel centred on each point of a fine grid reads [pre-mask counts] for the
        unlensed, rescaled galaxy ``gal`` (grid ``shape`` with pixel ``scale`` [arcsec], profile
        centre at the grid's true centre, as ``galsim.InterpolatedImage`` places an image)."""
        psf = make_psf(self.psf_fwhm, self.gsparams)
        box = galsim.Pixel(self.pixel_scale, gsparams=self.gsparams)
        ref = galsim.Convolve(gal, psf, box, gsparams=self.gsparams).drawImage(
            nx=shape[1], ny=shape[0], scale=scale, method="no_pixel")
        return ref.array * (self.pixel_scale / scale) ** 2

    def _source_masked_real(self, rg: galsim.RealGalaxy, rc, index: int) -> galsim.GSObject:
        """``rg`` rebuilt from its COSMOS image with the source-stage mask applied (not dilated)."""
        image = rg.gal_image
        reading = self._mask_reference(rg.dilate(self.alpha), image.array.shape, image.scale * self.alpha)
        masked = image.copy()
        masked.array[reading < self.mask_threshold] = 0.0
        noise_image, noise_scale, var = rc.getNoiseProperties(index)
        return galsim.RealGalaxy((masked, rg.psf_image, noise_image, noise_scale, var),
                                 flux_rescale=self.alpha**2, gsparams=self.gsparams)

    def _source_masked_profile(self, gal: galsim.GSObject) -> galsim.GSObject:
        """A parametric profile drawn on the fine grid (1/4 target pixel), masked, interpolated."""
        scale = self.pixel_scale / 4.0 / self.alpha  # before dilation: 1/4 target px after it
        n = 8 * STAMP_SIZE  # twice the stamp's side, after dilation
        img = gal.drawImage(nx=n, ny=n, scale=scale, method="no_pixel")
        reading = self._mask_reference(gal.dilate(self.alpha), img.array.shape, scale * self.alpha)
        img.array[reading < self.mask_threshold] = 0.0
        return galsim.InterpolatedImage(img, gsparams=self.gsparams)


SOURCES = {"parametric": ParametricSource, "cosmos": CosmosSource}
