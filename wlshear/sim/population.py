"""Which galaxies are drawn: population weights over a source catalogue.

- ``natural``: every galaxy of the source equally likely.
- ``homogenised``: the paper's training mix, equal numbers from each source-magnitude bin
  (COSMOS F814W bins [16, 19.5], [19.5, 21.5], [21.5, 23.5] in the paper).
- ``matched``: weights that make the (magnitude, log10 half-light radius) distribution match a
  target catalogue (CLASH): ratio of the two 2-D histograms, each smoothed by a Gaussian of one
  bin, clipped to [0, 10] (method.md). Magnitudes at the CLASH zero-point, radii in target pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter


def homogenised_weights(mag: np.ndarray, bins) -> np.ndarray:
    """Per-galaxy weights giving equal total weight to each non-empty magnitude bin.

    Galaxies outside every bin get weight 0. Bins are (lo, hi] pairs except the first, which
    includes its lower edge.
    """
    mag = np.asarray(mag, float)
    w = np.zeros(len(mag))
    bins = [tuple(b) for b in bins]
    nonempty = 0
    for j, (lo, hi) in enumerate(bins):
        sel = (mag >= lo if j == 0 else mag > lo) & (mag <= hi)
        if sel.any():
            nonempty += 1
            w[sel] = 1.0 / sel.sum()
    if nonempty == 0:
        raise ValueError(f"no galaxy falls in any magnitude bin {bins} (magnitudes {mag.min():.2f}..{mag.max():.2f})")
    return w / w.sum()


def read_target_catalog(path, mag_col: str = "mag", radius_col: str = "hlr_px"):
    """Read a target population (FITS or CSV/text table) with magnitude and radius columns.

    Returns (mag, radius) arrays; radius in target pixels. Column names are matched case-insensitively.
    """
    from astropy.table import Table

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"target population catalogue not found: {path}")
    if path.suffix.lower() in (".fits", ".fit", ".fz"):
        tab = Table.read(path)
    else:
        fmt = "csv" if path.suffix.lower() == ".csv" else "ascii"
        tab = Table.read(path, format=fmt)
    lower = {c.lower(): c for c in tab.colnames}
    missing = [c for c in (mag_col, radius_col) if c.lower() not in lower]
    if missing:
        raise ValueError(f"target catalogue {path} lacks column(s) {missing}; it has {tab.colnames}")
    mag = np.asarray(tab[lower[mag_col.lower()]], float)
    rad = np.asarray(tab[lower[radius_col.lower()]], float)
    ok = np.isfinite(mag) & np.isfinite(rad) & (rad > 0)
    if not ok.any():
        raise ValueError(f"target catalogue {path} has no row with finite magnitude and positive radius")
    return mag[ok], rad[ok]


def matched_weights(
    mag,
    radius_px,
    target_mag,
    target_radius_px,
    mag_edges=None,
    logr_edges=None,
    smooth_bins: float = 1.0,
    clip=(0.0, 10.0),
) -> np.ndarray:
    """Weights w_i = clip(H_target / H_source) at each galaxy's (mag, log10 r) bin, normalised.

    Default bins (method.md): magnitudes linspace(18.5, 28, 60), log10 radius
    linspace(log10 0.9, log10 25, 51), radius in target pixels.
    """
    if mag_edges is None:
        mag_edges = np.linspace(18.5, 28, 60)
    if logr_edges is None:
        logr_edges = np.linspace(np.log10(0.9), np.log10(25), 51)
    src_logr = np.log10(np.asarray(radius_px, float))
    hs, _, _ = np.histogram2d(mag, src_logr, bins=[mag_edges, logr_edges])
    ht, _, _ = np.histogram2d(target_mag, np.log10(target_radius_px), bins=[mag_edges, logr_edges])
    hs = gaussian_filter(hs / max(hs.sum(), 1), smooth_bins)
    ht = gaussian_filter(ht / max(ht.sum(), 1), smooth_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(hs > 0, ht / hs, 0.0)
    ratio = np.clip(ratio, *clip)
    im = np.clip(np.digitize(mag, mag_edges) - 1, 0, len(mag_edges) - 2)
    ir = np.clip(np.digitize(src_logr, logr_edges) - 1, 0, len(logr_edges) - 2)
    inside = (
        (np.asarray(mag) >= mag_edges[0]) & (np.asarray(mag) <= mag_edges[-1])
        & (src_logr >= logr_edges[0]) & (src_logr <= logr_edges[-1])
    )
    w = np.where(inside, ratio[im, ir], 0.0)
    if w.sum() <= 0:
        raise ValueError("population matching gives zero weight to every galaxy: source and target do not overlap")
    return w / w.sum()


def population_weights(source, kind: str = "natural", mag_bins=None, target_catalog=None,
                       target_mag_col: str = "mag", target_radius_col: str = "hlr_px",
                       galaxy_ids=None) -> np.ndarray:
    """Normalised per-galaxy draw probabilities for a source and a population kind.

    ``galaxy_ids``: draw only these galaxies (one side of a :func:`split_galaxies` split): the
    population is built over them alone (e.g. equal numbers per magnitude bin among them) and
    every other galaxy has weight 0. The result always has one entry per source galaxy."""
    n = len(source)
    ids = np.arange(n) if galaxy_ids is None else np.unique(np.asarray(galaxy_ids, dtype=np.int64))
    if len(ids) == 0 or ids[0] < 0 or ids[-1] >= n:
        raise ValueError(f"galaxy_ids must be a non-empty subset of 0..{n - 1}")
    cat = source.catalog
    if kind == "natural":
        w = np.full(len(ids), 1.0 / len(ids))
    elif kind == "homogenised":
        if not mag_bins:
            raise ValueError("population 'homogenised' needs mag_bins, e.g. [[16, 19.5], [19.5, 21.5], [21.5, 23.5]]")
        w = homogenised_weights(np.asarray(cat["mag_source"])[ids], mag_bins)
    elif kind == "matched":
        if target_catalog is None:
            raise ValueError("population 'matched' needs target_catalog (FITS/CSV with magnitude and radius)")
        tm, tr = read_target_catalog(target_catalog, target_mag_col, target_radius_col)
        w = matched_weights(np.asarray(cat["mag"])[ids], np.asarray(cat["hlr_px"])[ids], tm, tr)
    else:
        raise ValueError(f"unknown population kind {kind!r}; choose natural, homogenised or matched")
    full = np.zeros(n)
    full[ids] = w
    return full


def split_galaxies(n: int, test_fraction: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Galaxy-disjoint split of a source's ``n`` galaxy ids: ``(train_ids, test_ids)``, sorted,
    ``round(test_fraction * n)`` ids (at least 1 each side) on the test side, chosen by a fixed-seed
    permutation (the same ids for the same ``n``, fraction and seed, in any process)."""
    n = int(n)
    if not 0 < test_fraction < 1:
        raise ValueError(f"split test_fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"a galaxy-disjoint split needs at least 2 galaxies, the source has {n}")
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    perm = np.random.default_rng([int(seed), 85015]).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
