"""Reading CLASH HST/ACS cluster fields and weak-lensing catalogues.

File layout (public CLASH high-level science products, 0.065 arcsec/px ACS mosaics)::

    hlsp_clash_hst_acs-65mas_{cluster}_{filter}_v1_drz.fits   science image (counts/s, zp 25.4193)
    hlsp_clash_hst_acs-65mas_{cluster}_{filter}_v1_wht.fits   inverse-variance weight map
    hlsp_clash_hst_acs-ir_{cluster}_cat.txt                   photometric catalogue (text)

A compressed copy (same name + ``.gz``) is accepted when the plain file is absent.

The *total* image used for detection and stamps is the mean of the n filters and its inverse
variance is ``n**2 / sum_i(1 / w_i)`` (the variance of a mean of n independent images).
Pixels whose weight is below ``min_weight`` in any filter, or that are NaN/inf in any science or
weight image, are *bad*: they get image 0 and inverse variance 0 and are marked in ``Field.bad``.

Array convention (docs/CONVENTIONS.md): axis 0 is y (row), axis 1 is x (column); pixel
coordinates are 0-indexed with pixel centres at integers (the ``sep`` / numpy convention,
which is also astropy's ``pixel_to_world_values`` convention).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import ascii as asciitable
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from wlshear.sim.constants import PIXEL_SCALE

DEFAULT_FILTERS: tuple[str, ...] = ("f435w", "f475w", "f606w", "f625w", "f775w", "f814w", "f850lp")
SCI_PATTERN = "hlsp_clash_hst_acs-65mas_{cluster}_{filter}_v1_drz.fits"
WHT_PATTERN = "hlsp_clash_hst_acs-65mas_{cluster}_{filter}_v1_wht.fits"
CATALOGUE_PATTERN = "hlsp_clash_hst_acs-ir_{cluster}_cat.txt"

RA_NAMES = ("ra", "alpha_j2000", "raj2000", "ra_deg", "alpha")
DEC_NAMES = ("dec", "delta_j2000", "dej2000", "decj2000", "dec_deg", "delta")


@dataclass
class Field:
    """One cluster field combined over filters.

    Attributes
    ----------
    image : (ny, nx) float64, mean of the filters (counts/s); 0 on bad pixels.
    ivar : (ny, nx) float64, inverse variance of ``image`` ((counts/s)^-2); 0 on bad pixels.
    bad : (ny, nx) bool, True where any filter had weight < min_weight or a non-finite value.
    wcs : celestial astropy WCS of the science images (0-indexed pixel <-> sky in degrees).
    cluster : cluster name as used in the file names.
    filters : filters actually combined.
    sci_paths, wht_paths : the files read, in the order of ``filters``.
    missing_filters : requested filters that were not found (empty if all present).
    pixel_scale : arcsec per pixel (0.065 for the CLASH mosaics).
    """

    image: np.ndarray
    ivar: np.ndarray
    bad: np.ndarray
    wcs: WCS
    cluster: str
    filters: list[str]
    sci_paths: list[Path]
    wht_paths: list[Path]
    missing_filters: list[str] = field(default_factory=list)
    pixel_scale: float = PIXEL_SCALE

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape


def _existing(path: Path) -> Path | None:
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    if gz.is_file():
        return gz
    return None


def find_filter_files(
    directory: str | Path,
    cluster: str,
    filters: Sequence[str] | None = None,
    pattern: str = SCI_PATTERN,
    wht_pattern: str | None = None,
    return_missing: bool = False,
):
    """Locate the science and weight files of one cluster.

    Parameters
    ----------
    directory : folder holding the CLASH files.
    cluster : cluster name as it appears in the file names (e.g. ``"a383"``, ``"macs0416"``).
    filters : filters to look for (default ``DEFAULT_FILTERS``).
    pattern : science-file name pattern with ``{cluster}`` and ``{filter}`` fields.
    wht_pattern : weight-file pattern; default: ``pattern`` with ``_drz.fits`` -> ``_wht.fits``.
    return_missing : if True return ``(found, missing)`` instead of ``found`` only.

    Returns
    -------
    found : list of ``(filter, sci_path, wht_path)`` for every filter whose science *and* weight
        files both exist. Missing filters are reported with a ``UserWarning`` (and returned as
        ``missing`` if requested) as long as at least one filter is complete.

    Raises
    ------
    FileNotFoundError : if the directory does not exist or no filter is complete; the message
        lists every file looked for.
    """
    directory = Path(directory)
    filters = list(DEFAULT_FILTERS if filters is None else filters)
    if not filters:
        raise ValueError("find_filter_files: empty filter list; give at least one filter name")
    if wht_pattern is None:
        if "_drz.fits" not in pattern:
            raise ValueError(
                f"cannot derive the weight-file pattern from {pattern!r}; pass wht_pattern explicitly"
            )
        wht_pattern = pattern.replace("_drz.fits", "_wht.fits")
    if not directory.is_dir():
        raise FileNotFoundError(f"CLASH data directory {directory} does not exist")

    found, missing, missing_files = [], [], []
    for filt in filters:
        sci = directory / pattern.format(cluster=cluster, filter=filt)
        wht = directory / wht_pattern.format(cluster=cluster, filter=filt)
        sci_ok, wht_ok = _existing(sci), _existing(wht)
        if sci_ok is not None and wht_ok is not None:
            found.append((filt, sci_ok, wht_ok))
        else:
            missing.append(filt)
            missing_files += [str(p) for p, ok in ((sci, sci_ok), (wht, wht_ok)) if ok is None]
    if not found:
        raise FileNotFoundError(
            f"no complete filter (science + weight) for cluster {cluster!r} in {directory}; "
            f"missing files: {missing_files}"
        )
    if missing:
        warnings.warn(
            f"cluster {cluster!r}: filters {missing} incomplete or absent (missing files: "
            f"{missing_files}); combining the {len(found)} present filters "
            f"{[f for f, _, _ in found]}",
            UserWarning,
            stacklevel=2,
        )
    return (found, missing) if return_missing else found


def read_image(path: str | Path) -> tuple[np.ndarray, fits.Header]:
    """Read the first HDU holding 2-D data as native-endian float64 plus its header.

    Raises ``ValueError`` naming the file if it is not readable FITS or has no 2-D image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FITS file {path} does not exist")
    try:
        with fits.open(path, memmap=False) as hdul:
            for hdu in hdul:
                if hdu.is_image and hdu.data is not None and hdu.data.ndim == 2:
                    data = np.ascontiguousarray(hdu.data, dtype=np.float64)
                    return data, hdu.header.copy()
    except Exception as exc:  # astropy raises OSError/TypeError/ValueError for corrupt files
        raise ValueError(f"could not read FITS file {path}: {type(exc).__name__}: {exc}") from exc
    raise ValueError(f"FITS file {path} has no HDU with 2-D image data")


def celestial_wcs(header: fits.Header, path: str | Path = "<header>") -> WCS:
    """Celestial WCS from a FITS header; ``ValueError`` if there is none or it is invalid."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header)
    except Exception as exc:
        raise ValueError(f"invalid WCS in {path}: {type(exc).__name__}: {exc}") from exc
    if not wcs.has_celestial:
        raise ValueError(
            f"{path} has no celestial WCS (need CTYPE1/2 = RA---TAN/DEC--TAN, CRVAL, CRPIX and CD "
            "or CDELT keywords); cannot map pixels to RA/Dec"
        )
    cel = wcs.celestial
    if cel.naxis != 2:
        raise ValueError(f"{path}: celestial WCS has {cel.naxis} axes, expected 2")
    try:
        ra, dec = cel.pixel_to_world_values(0.0, 0.0)
    except Exception as exc:
        raise ValueError(f"invalid WCS in {path}: {type(exc).__name__}: {exc}") from exc
    if not (np.isfinite(ra) and np.isfinite(dec)):
        raise ValueError(f"invalid WCS in {path}: pixel (0, 0) maps to non-finite sky coordinates")
    return cel


def combine_filters(
    scis: Sequence[np.ndarray], whts: Sequence[np.ndarray], min_weight: float = 100.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine n filters into a total image.

    image = mean_i(sci_i); ivar = n**2 / sum_i(1 / w_i) (w_i are inverse-variance weights);
    bad = any_i(w_i < min_weight) | any non-finite sci_i or w_i. Bad pixels: image 0, ivar 0.

    Returns ``(image, ivar, bad)`` as C-contiguous float64, float64, bool arrays.
    """
    if len(scis) == 0 or len(scis) != len(whts):
        raise ValueError(
            f"combine_filters needs the same non-zero number of science and weight images "
            f"(got {len(scis)} and {len(whts)})"
        )
    shape = np.shape(scis[0])
    for k, (s, w) in enumerate(zip(scis, whts)):
        if np.shape(s) != shape or np.shape(w) != shape:
            raise ValueError(
                f"filter {k}: science {np.shape(s)} / weight {np.shape(w)} do not match the first "
                f"image's shape {shape}; all filters must be on the same pixel grid"
            )
    n = len(scis)
    total = np.zeros(shape, dtype=np.float64)
    inv_sum = np.zeros(shape, dtype=np.float64)
    bad = np.zeros(shape, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for s, w in zip(scis, whts):
            s = np.asarray(s, dtype=np.float64)
            w = np.asarray(w, dtype=np.float64)
            bad |= ~np.isfinite(s) | ~np.isfinite(w) | ~(w >= min_weight)
            total += np.where(np.isfinite(s), s, 0.0)
            inv_sum += np.where(w > 0, 1.0 / w, np.inf)
        image = total / n
        ivar = n**2 / inv_sum
    image[bad] = 0.0
    ivar[bad] = 0.0
    ivar[~np.isfinite(ivar)] = 0.0
    return np.ascontiguousarray(image), np.ascontiguousarray(ivar), bad


def load_field(
    directory: str | Path,
    cluster: str,
    filters: Sequence[str] | None = None,
    min_weight: float = 100.0,
    pattern: str = SCI_PATTERN,
    wht_pattern: str | None = None,
    pixel_scale: float = PIXEL_SCALE,
) -> Field:
    """Find, read and combine the filters of one cluster into a :class:`Field`.

    The WCS is taken from the first filter's science header. All filters must share the image
    shape (``ValueError`` otherwise). Missing filters are warned about and recorded in
    ``Field.missing_filters`` (see :func:`find_filter_files`).
    """
    found, missing = find_filter_files(
        directory, cluster, filters, pattern=pattern, wht_pattern=wht_pattern, return_missing=True
    )
    scis, whts, wcs, shape0 = [], [], None, None
    for filt, sci_path, wht_path in found:
        sci, hdr = read_image(sci_path)
        wht, _ = read_image(wht_path)
        if shape0 is None:
            shape0 = sci.shape
            wcs = celestial_wcs(hdr, sci_path)
        if sci.shape != shape0 or wht.shape != shape0:
            raise ValueError(
                f"filter {filt}: {sci_path.name} {sci.shape} / {wht_path.name} {wht.shape} differ "
                f"from the first filter's shape {shape0}; CLASH mosaics of one cluster must share "
                "a pixel grid"
            )
        scis.append(sci)
        whts.append(wht)
    image, ivar, bad = combine_filters(scis, whts, min_weight=min_weight)
    return Field(
        image=image,
        ivar=ivar,
        bad=bad,
        wcs=wcs,
        cluster=cluster,
        filters=[f for f, _, _ in found],
        sci_paths=[s for _, s, _ in found],
        wht_paths=[w for _, _, w in found],
        missing_filters=list(missing),
        pixel_scale=pixel_scale,
    )


def write_field(field_: Field, image_path: str | Path, ivar_path: str | Path | None = None) -> None:
    """Write the total image (and optionally its inverse variance) as FITS with the field WCS.

    Useful input for ``python -m wlshear.tasks.noise_kernel image=... weight=...``.
    """
    hdr = field_.wcs.to_header()
    hdr["CLUSTER"] = field_.cluster
    hdr["FILTERS"] = ",".join(field_.filters)
    fits.PrimaryHDU(field_.image.astype(np.float32), header=hdr).writeto(image_path, overwrite=True)
    if ivar_path is not None:
        fits.PrimaryHDU(field_.ivar.astype(np.float32), header=hdr).writeto(ivar_path, overwrite=True)


# ----------------------------------------------------------------------------- catalogues


def _find_column(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def _read_commented_header_text(path: Path) -> Table:
    """Whitespace table whose column names are on the last '#' line with the right token count."""
    lines = path.read_text().splitlines()
    comments, data = [], []
    for line in lines:
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            if not data:
                comments.append(s.lstrip("#").split())
        else:
            data.append(s)
    if not data:
        raise ValueError("no data rows")
    ncol = len(data[0].split())
    names = next((c for c in reversed(comments) if len(c) == ncol), None)
    if names is None:
        raise ValueError("no comment line with one name per column")
    return asciitable.read(data, format="no_header", names=names, guess=False)


def read_catalogue(path: str | Path) -> Table:
    """Read a weak-lensing or photometric catalogue (FITS table, CSV or whitespace text).

    Columns are matched case-insensitively. The returned table keeps all original columns and
    adds standardised ``ra`` and ``dec`` (degrees; from RA/DEC, ALPHA_J2000/DELTA_J2000, ...)
    and, when present, ``g1`` and ``g2`` (from G1/G2).

    Raises ``FileNotFoundError`` if the file is absent and ``ValueError`` if it cannot be parsed
    or lacks RA/Dec columns (the message lists the columns found).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"catalogue {path} does not exist")
    with open(path, "rb") as fh:
        is_fits = fh.read(6) == b"SIMPLE" or path.name.lower().endswith((".fits", ".fit", ".fits.gz"))
    table = None
    errors = []
    if is_fits:
        try:
            table = Table.read(path, format="fits")
        except Exception as exc:
            raise ValueError(f"could not read FITS catalogue {path}: {type(exc).__name__}: {exc}") from exc
    else:
        readers = (
            lambda: asciitable.read(path, format="commented_header", guess=False),
            lambda: asciitable.read(path, format="csv", guess=False),
            lambda: asciitable.read(path, format="basic", guess=False),
            lambda: _read_commented_header_text(path),
            lambda: asciitable.read(path),
        )
        for reader in readers:
            try:
                t = reader()
            except Exception as exc:  # try the next layout
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if len(t.colnames) > 1 and _find_column(t.colnames, RA_NAMES) and _find_column(
                t.colnames, DEC_NAMES
            ):
                table = t
                break
            if table is None and len(t.colnames) > 1:
                table = t  # keep the first plausible parse for the error message
        if table is None:
            raise ValueError(f"could not parse catalogue {path} as a text table: {errors[-1:]}")
    ra = _find_column(table.colnames, RA_NAMES)
    dec = _find_column(table.colnames, DEC_NAMES)
    if ra is None or dec is None:
        raise ValueError(
            f"catalogue {path} has no RA/Dec columns (accepted names: {RA_NAMES} / {DEC_NAMES}, "
            f"any case); columns found: {table.colnames}"
        )
    out = Table(table, copy=True)
    ra_vals = np.asarray(out[ra], dtype=np.float64)
    dec_vals = np.asarray(out[dec], dtype=np.float64)
    if "ra" in out.colnames:
        out.remove_column("ra")
    if "dec" in out.colnames:
        out.remove_column("dec")
    out["ra"] = ra_vals
    out["dec"] = dec_vals
    for g in ("g1", "g2"):
        col = _find_column(table.colnames, (g,))
        if col is not None and col != g:
            out[g] = np.asarray(out[col], dtype=np.float64)
    return out
