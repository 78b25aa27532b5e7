"""All lensing maths of the package: the NFW cluster lens, lensing efficiency, magnification, reduced
shear and tangential-shear profiles.

Cosmology: flat LCDM with Omega_m = 0.27, H0 = 70 km/s/Mpc (astropy ``FlatLambdaCDM``).

NFW halo (Wright & Brainerd 2000, ApJ 534, 34): rho(r) = rho_s / [(r/r_s)(1 + r/r_s)^2] with
r_200 the radius of mean density 200 rho_crit(z_lens), r_s = r_200 / c and
rho_s = delta_c rho_crit, delta_c = (200/3) c^3 / [ln(1 + c) - c / (1 + c)].
With x = R / r_s the projected surface density and its mean inside R are

    Sigma(x)    = 2 r_s rho_s F(x) / (x^2 - 1),
    Sigmabar(x) = 4 r_s rho_s H(x) / x^2,

    F(x) = 1 - 2/sqrt(1-x^2) artanh sqrt((1-x)/(1+x))   (x < 1)
           1 - 2/sqrt(x^2-1) arctan sqrt((x-1)/(1+x))   (x > 1),   Sigma(1) = 2 r_s rho_s / 3,
    H(x) = ln(x/2) + 2/sqrt(1-x^2) artanh sqrt((1-x)/(1+x))   (x < 1)
           ln(x/2) + 2/sqrt(x^2-1) arctan sqrt((x-1)/(1+x))   (x > 1),   H(1) = 1 + ln(1/2).

kappa = Sigma / Sigma_crit, gamma_t = (Sigmabar - Sigma) / Sigma_crit with
Sigma_crit = c^2 D_s / (4 pi G D_l D_ls); reduced shear g = gamma / (1 - kappa).

Shear components at a position (dx, dy) from the centre (image pixel frame: x = column,
y = row, angle phi = atan2(dy, dx)); tangential convention

    g_t = -(g1 cos 2phi + g2 sin 2phi),   g_x = g1 sin 2phi - g2 cos 2phi,

so a tangential (lensing) pattern has g_t > 0 and g = (-g_t cos 2phi, -g_t sin 2phi).
Angles are in arcsec, physical lengths in Mpc, masses in Msun.
"""

from __future__ import annotations

import numpy as np
from astropy import constants as const
from astropy import units as u
from astropy.cosmology import FlatLambdaCDM
from astropy.table import Table

ARCSEC = np.pi / (180.0 * 3600.0)  # radians


def default_cosmology() -> FlatLambdaCDM:
    """Flat LCDM used for the CLASH analysis (Omega_m 0.27, H0 70)."""
    return FlatLambdaCDM(H0=70.0, Om0=0.27)


def lensing_efficiency(z_lens: float, z_source, cosmo=None) -> np.ndarray:
    """D_ls / D_s (angular-diameter distances); 0 for sources at or in front of the lens."""
    cosmo = cosmo or default_cosmology()
    zs = np.atleast_1d(np.asarray(z_source, dtype=np.float64))
    out = np.zeros_like(zs)
    behind = zs > z_lens
    if behind.any():
        try:  # astropy >= 7: two-redshift form; older: angular_diameter_distance_z1z2
            d_ls = cosmo.angular_diameter_distance(z_lens, zs[behind])
        except TypeError:
            d_ls = cosmo.angular_diameter_distance_z1z2(z_lens, zs[behind])
        d_ls = d_ls.to_value(u.Mpc)
        d_s = cosmo.angular_diameter_distance(zs[behind]).to_value(u.Mpc)
        out[behind] = d_ls / d_s
    return out if np.ndim(z_source) else out[0]


def sigma_crit(z_lens: float, z_source: float, cosmo=None) -> float:
    """Critical surface density c^2 D_s / (4 pi G D_l D_ls) in Msun / Mpc^2 (inf if z_s <= z_l)."""
    cosmo = cosmo or default_cosmology()
    if z_source <= z_lens:
        return np.inf
    d_l = cosmo.angular_diameter_distance(z_lens)
    beta = lensing_efficiency(z_lens, z_source, cosmo)
    val = const.c**2 / (4 * np.pi * const.G * d_l * beta)
    return float(val.to_value(u.Msun / u.Mpc**2))


def nfw_parameters(m200: float, conc: float, z_lens: float, cosmo=None) -> dict:
    """r200 [Mpc], r_s [Mpc], rho_s [Msun/Mpc^3], delta_c and rho_crit(z) [Msun/Mpc^3]."""
    cosmo = cosmo or default_cosmology()
    rho_c = float(cosmo.critical_density(z_lens).to_value(u.Msun / u.Mpc**3))
    r200 = (3.0 * m200 / (4.0 * np.pi * 200.0 * rho_c)) ** (1.0 / 3.0)
    delta_c = (200.0 / 3.0) * conc**3 / (np.log1p(conc) - conc / (1.0 + conc))
    return {"r200": r200, "r_s": r200 / conc, "rho_s": delta_c * rho_c, "delta_c": delta_c, "rho_crit": rho_c}


def _nfw_f_h(x: np.ndarray):
    """F(x)/(x^2-1) and H(x) of the module docstring, with a series near x = 1."""
    x = np.asarray(x, dtype=np.float64)
    f_over = np.empty_like(x)
    h = np.empty_like(x)
    lo = x < 1 - 1e-4
    hi = x > 1 + 1e-4
    mid = ~(lo | hi)
    xl = x[lo]
    s = np.sqrt(1 - xl**2)
    at = np.arctanh(np.sqrt((1 - xl) / (1 + xl)))
    f_over[lo] = (1 - 2 / s * at) / (xl**2 - 1)
    h[lo] = np.log(xl / 2) + 2 / s * at
    xh = x[hi]
    s = np.sqrt(xh**2 - 1)
    at = np.arctan(np.sqrt((xh - 1) / (1 + xh)))
    f_over[hi] = (1 - 2 / s * at) / (xh**2 - 1)
    h[hi] = np.log(xh / 2) + 2 / s * at
    # first-order expansion about x = 1: F/(x^2-1) = 1/3 - 0.4 (x - 1); H = 1 - ln 2 + (x-1)/3
    d = x[mid] - 1
    f_over[mid] = 1.0 / 3.0 - 0.4 * d
    h[mid] = 1 - np.log(2) + d / 3.0
    return f_over, h


def nfw_sigma(R_mpc, m200: float, conc: float, z_lens: float, cosmo=None):
    """NFW surface density Sigma(R) and mean inside R, Sigmabar(<R), in Msun/Mpc^2."""
    p = nfw_parameters(m200, conc, z_lens, cosmo)
    x = np.asarray(R_mpc, dtype=np.float64) / p["r_s"]
    if np.any(x <= 0):
        raise ValueError("nfw_sigma: projected radii must be > 0")
    f_over, h = _nfw_f_h(x)
    k = p["r_s"] * p["rho_s"]
    return 2 * k * f_over, 4 * k * h / x**2


def nfw_kappa_gamma(R_arcsec, m200: float, conc: float, z_lens: float, z_source: float, cosmo=None):
    """Convergence and tangential shear of an NFW halo at projected radii ``R_arcsec``.

    Returns ``(kappa, gamma_t)`` arrays (0 for sources in front of the lens).
    """
    cosmo = cosmo or default_cosmology()
    d_l = float(cosmo.angular_diameter_distance(z_lens).to_value(u.Mpc))
    R = np.asarray(R_arcsec, dtype=np.float64) * ARCSEC * d_l
    sc = sigma_crit(z_lens, z_source, cosmo)
    if not np.isfinite(sc):
        return np.zeros_like(R), np.zeros_like(R)
    sig, sig_bar = nfw_sigma(R, m200, conc, z_lens, cosmo)
    return sig / sc, (sig_bar - sig) / sc


def nfw_magnification(g1, g2, kappa) -> np.ndarray:
    """mu = 1 / ((1 - kappa)^2 - |gamma|^2) with gamma = g (1 - kappa)."""
    g2abs = np.asarray(g1) ** 2 + np.asarray(g2) ** 2
    return 1.0 / ((1.0 - np.asarray(kappa)) ** 2 * (1.0 - g2abs))


def nfw_gt_model(r_arcsec, truth: dict) -> np.ndarray:
    """Reduced tangential shear g_t = gamma_t / (1 - kappa) of the truth NFW at radii [arcsec]."""
    kappa, gamma = nfw_kappa_gamma(np.asarray(r_arcsec, dtype=np.float64), truth["m200"], truth["conc"],
                                   truth["z_lens"], truth["z_source"])
    return gamma / (1.0 - kappa)


def shear_components(gt, dx, dy, gx=0.0):
    """(g1, g2) from tangential/cross shear at offsets (dx, dy) from the centre (inverse of
    :func:`tangential_cross`)."""
    phi = np.arctan2(np.asarray(dy, dtype=np.float64), np.asarray(dx, dtype=np.float64))
    c2, s2 = np.cos(2 * phi), np.sin(2 * phi)
    return -gt * c2 + gx * s2, -gt * s2 - gx * c2


def tangential_cross(g1, g2, dx, dy):
    """Tangential and cross shear: g_t = -(g1 cos 2phi + g2 sin 2phi), g_x = g1 sin 2phi - g2 cos 2phi."""
    phi = np.arctan2(np.asarray(dy, dtype=np.float64), np.asarray(dx, dtype=np.float64))
    c2, s2 = np.cos(2 * phi), np.sin(2 * phi)
    g1 = np.asarray(g1, dtype=np.float64)
    g2 = np.asarray(g2, dtype=np.float64)
    return -(g1 * c2 + g2 * s2), g1 * s2 - g2 * c2


def nfw_reduced_shear(dx_arcsec, dy_arcsec, m200: float, conc: float, z_lens: float, z_source: float, cosmo=None, kappa_max: float = 0.9):
    """Reduced shear (g1, g2) and kappa of an NFW halo at offsets from its centre (arcsec).

    Offsets are in the image frame (dx along x / columns, dy along y / rows). Where
    kappa >= ``kappa_max`` (near the strong-lensing core, where g is ill-defined for weak
    lensing) g is set to NaN.
    """
    dx = np.asarray(dx_arcsec, dtype=np.float64)
    dy = np.asarray(dy_arcsec, dtype=np.float64)
    R = np.maximum(np.hypot(dx, dy), 1e-3)
    kappa, gamma = nfw_kappa_gamma(R, m200, conc, z_lens, z_source, cosmo)
    with np.errstate(divide="ignore", invalid="ignore"):
        gt = np.where(kappa < kappa_max, gamma / (1 - kappa), np.nan)
    g1, g2 = shear_components(gt, dx, dy)
    return g1, g2, kappa


def shear_profile(x, y, g1, g2, center, bins, weights=None, pixel_scale: float | None = None) -> Table:
    """Tangential and cross shear in radial bins around ``center``.

    Parameters
    ----------
    x, y : galaxy positions (image pixels, or any unit matching ``center`` and ``bins``).
    g1, g2 : shear estimates. center : (xc, yc). bins : radial bin edges (same unit as x, y,
        or arcsec if ``pixel_scale`` is given, in which case x, y are pixels).
    weights : optional per-galaxy weights (default equal).

    Returns
    -------
    Table with ``r_lo``, ``r_hi``, ``r_mean`` (weighted mean radius), ``gt``, ``gt_err``,
    ``gx``, ``gx_err`` (weighted means; errors = weighted std / sqrt(n_eff)), ``n``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    dx, dy = x - center[0], y - center[1]
    r = np.hypot(dx, dy) * (pixel_scale if pixel_scale else 1.0)
    gt, gx = tangential_cross(g1, g2, dx, dy)
    w = np.ones_like(r) if weights is None else np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(gt) & np.isfinite(gx) & np.isfinite(w) & (w > 0)
    bins = np.asarray(bins, dtype=np.float64)
    nb = bins.size - 1
    rows = {k: np.full(nb, np.nan) for k in ("r_mean", "gt", "gt_err", "gx", "gx_err")}
    n = np.zeros(nb, dtype=np.int64)
    for b in range(nb):
        sel = ok & (r >= bins[b]) & (r < bins[b + 1])
        n[b] = sel.sum()
        if n[b] == 0:
            continue
        ww = w[sel]
        sw = ww.sum()
        n_eff = sw**2 / np.sum(ww**2)
        rows["r_mean"][b] = np.sum(ww * r[sel]) / sw
        for name, v in (("gt", gt[sel]), ("gx", gx[sel])):
            mean = np.sum(ww * v) / sw
            rows[name][b] = mean
            if n[b] > 1:
                var = np.sum(ww * (v - mean) ** 2) / sw * n_eff / (n_eff - 1)
                rows[name + "_err"][b] = np.sqrt(var / n_eff)
    return Table({"r_lo": bins[:-1], "r_hi": bins[1:], **rows, "n": n})


# ----------------------------------------------------------------------------- frames

#: largest relative departure of the WCS pixel-to-sky matrix from a scaled rotation (with or without
#: a reflection) that the frame conversion accepts: beyond it the pixel grid is skewed or stretched
#: on the sky and a shear cannot be carried over by a rotation alone
MAX_WCS_SKEW = 1e-3


def wcs_frame(wcs) -> tuple[float, bool]:
    """Orientation of the pixel frame on the sky: ``(theta [rad], parity_flip)``.

    Sky frame (``docs/CONVENTIONS.md``): axes (east, north) of the tangent plane,
    (xi, eta) = (dRA cos(Dec), dDec). The WCS pixel-to-sky matrix (CD, ``wcs.pixel_scale_matrix``)
    maps a pixel step (dx, dy) to (dxi, deta); normalised, it is a rotation by ``theta``
    (``parity_flip`` False) or a rotation by ``theta`` after the reflection y -> -y (``parity_flip``
    True: the usual north-up / east-left image, CD1_1 < 0, CD2_2 > 0, has theta = pi).
    Raises ``ValueError`` for a skewed or non-square pixel grid (beyond :data:`MAX_WCS_SKEW`).
    """
    m = np.asarray(wcs.pixel_scale_matrix if hasattr(wcs, "pixel_scale_matrix") else wcs, dtype=np.float64)
    if m.shape != (2, 2):
        raise ValueError(f"need a 2-D celestial WCS (2 x 2 pixel-to-sky matrix), got shape {m.shape}")
    det = float(np.linalg.det(m))
    if not np.isfinite(det) or det == 0:
        raise ValueError("the WCS pixel-to-sky matrix is singular: no sky frame")
    flip = det < 0
    j = m / np.sqrt(abs(det))
    if flip:
        j = j @ np.diag([1.0, -1.0])  # j = R(theta) P  ->  R(theta) = j P
    if np.abs(j - np.array([[j[0, 0], -j[1, 0]], [j[1, 0], j[0, 0]]])).max() > MAX_WCS_SKEW or \
            abs(np.hypot(j[0, 0], j[1, 0]) - 1) > MAX_WCS_SKEW:
        raise ValueError("the WCS pixel grid is skewed or stretched on the sky (not a rotation, with or without a "
                         "flip): shears cannot be converted between the pixel and sky frames")
    return float(np.arctan2(j[1, 0], j[0, 0])), bool(flip)


def pixel_to_sky_shear(g, wcs) -> np.ndarray:
    """Shears (N, 2) in the image pixel frame (x = column, y = row, angles from +x towards +y) ->
    the sky frame (angles from east towards north): ``g_sky = conj^p(g) exp(2 i theta)`` with
    ``(theta, p)`` = :func:`wcs_frame`. For the usual north-up / east-left image this is
    ``(g1, -g2)``."""
    theta, flip = wcs_frame(wcs)
    g = np.asarray(g, dtype=np.float64)
    z = g[..., 0] + 1j * g[..., 1]
    if flip:
        z = np.conj(z)
    z = z * np.exp(2j * theta)
    return np.stack([z.real, z.imag], -1)


def sky_to_pixel_shear(g, wcs) -> np.ndarray:
    """The inverse of :func:`pixel_to_sky_shear`: sky-frame shears (N, 2) -> the pixel frame."""
    theta, flip = wcs_frame(wcs)
    g = np.asarray(g, dtype=np.float64)
    z = (g[..., 0] + 1j * g[..., 1]) * np.exp(-2j * theta)
    if flip:
        z = np.conj(z)
    return np.stack([z.real, z.imag], -1)
