"""Batched Fourier-space renderer in torch (``backend='torch'``), checked against GalSim.

``draw_batch(renderer, params, size)`` returns the same images as the GalSim backend
(``renderer.draw_galsim(params, i, size).array`` for every row): the noiseless, mirrored,
rotated, lensed galaxy convolved with the PSF and the pixel, drawn on a ``size x size`` grid of
``renderer.pixel_scale`` [arcsec / pixel] with the profile centre at the 0-indexed pixel
((size-1)/2 + dx, (size-1)/2 + dy) (GalSim's ``true_center`` plus ``offset``). Masking, flux
factor and noise are the renderer's shared post-processing and are not applied here.

Method
------
Every stamp applies one linear map of real-space coordinates to its galaxy,
A = sqrt(mu) S(g) R(theta) M (mirror M = diag(-1, 1), rotation R, shear S, magnification mu);
the transformed profile f'(x) = f(A^-1 x) has F'(k) = |det A| F(A^T k) (flux scales by mu, as
GalSim's ``lens``). The stamp is sum_k F'(k) T(k) exp(i k . x) over a k-grid, with T the PSF x
pixel transfer function.

1. Preparation, once per galaxy (cached per source object and galaxy id, in this process only).

   *Analytic galaxies* (any sum of sheared / dilated / flux-scaled Sersic, DeVaucouleurs,
   Exponential and Gaussian profiles plus ``RandomKnots`` point sources: every
   ``ParametricSource`` galaxy and the COSMOS parametric fits): the GalSim object tree is
   decomposed into radial components c with a real-space map J_c (intrinsic shear, size) and a
   flux w_c, F(q) = sum_c w_c U_c(|J_c^T q|), where U_c is the Fourier transform of the
   unit-size, unit-flux round profile, tabulated once per process and profile type (per Sersic
   index and GSParams) from GalSim's own ``kValue`` on a 1-D grid of kappa = u / (1 - u) *
   ``table_scale``, uniform in u (linear interpolation). Knots are a list of positions and
   fluxes. Preparation is the decomposition plus a check of the decomposition against GalSim's
   ``kValue`` at a few frequencies (a galaxy that fails the check uses the generic path):
   ~0.1 ms per galaxy.

   *Other profiles* (e.g. COSMOS ``RealGalaxy``), generic path: GalSim samples F(q) of the
   unlensed galaxy on a square grid (``gal.drawKImage``) of spacing dq = 2 pi / (oversample L)
   [rad / arcsec] (L: GalSim's ``2 pi / stepk``, clipped to [min_extent, max_extent] arcsec) out
   to the largest |q| any allowed lensing can map onto a frequency the PSF x pixel lets through;
   the half plane q_x >= 0 is kept as cubic B-spline coefficients (F(-q) = conj F(q)).

2. Per batch, grouped by output period (the real-space period of the k-grid, ``periods``):
   the k-grid is the half plane of a fine real-space grid of spacing p/2, kept where
   |T| > ``k_eps`` (P points). Analytic stamps: |J_c^T A^T k| = sqrt(k^T Q k) with the 2x2 form
   Q = (A J_c)(A J_c)^T, one table look-up per component for all stamps of the group at once;
   generic stamps: cubic B-spline interpolation of F at A^T k (four bilinear ``grid_sample``
   fetches). The values times T are scattered on the fine grid; the fine spectrum is folded
   onto the pixel grid (= sub-sampling at pixel centres), the shift phase exp(i k . x0) is
   applied on the folded grid (the alias rows/columns differ by a per-stamp constant phase),
   and one batched ``irfft2`` gives the images; the output is the top-left ``size x size`` crop.
   Knots of analytic galaxies (Gaussian PSF) are drawn in real space: each lensed point source
   convolved with the PSF and the pixel is a product of two differences of normal CDFs.

   The period is chosen per stamp: analytic stamps take the smallest period whose wrapped-around
   light (each component's real-space profile, tabulated with GalSim's ``xValue``, evaluated at
   the closest distance a replica reaches, using the stamp's own A) is below ``wrap_tol`` x the
   stamp's PSF-smoothed central brightness; generic galaxies use the preparation's estimate for
   the largest allowed stretch.

Accuracy and speed are measured by ``benchmarks/render_torch.py`` and asserted by
``tests/test_torch_render.py`` (max |residual| < 1% of the stamp peak, adaptive-moment
ellipticity difference < 1e-3 against GalSim).

Limitations: the PSF must be the same for every stamp (it is per renderer); knots are drawn in
real space only for a Gaussian PSF (otherwise knotty galaxies use the generic path); galaxy
light beyond the output period wraps around, like GalSim's own folding; GalSim also truncates k
at the PSF's ``maxk`` (square k-grid) while this renderer keeps frequencies to ``k_eps``, so
tiny (<< 1e-3 of the peak) differences remain. Truncated Sersic profiles and shifted components
use the generic path.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from wlshear.sim.constants import PIXEL_SCALE, STAMP_SIZE

log = logging.getLogger(__name__)


@dataclass
class TorchRenderSettings:
    """Numerical settings of the torch renderer (attributes of the module-level ``SETTINGS``;
    change them before drawing).

    analytic : decompose analytic GalSim profiles into tabulated radial components (fast
        preparation and drawing); False sends every galaxy through the generic k-grid path.
    table_size, table_scale : radial tables of the analytic path: ``table_size`` samples of the
        round unit profile's Fourier transform at kappa = table_scale u / (1 - u), u uniform on
        [0, 1] (kappa = |q| x half-light radius, or scale radius / sigma).
    analytic_tol : largest |F_decomposed - F_GalSim| / flux at the check frequencies accepted
        for the analytic path.
    oversample : generic path: k-grid oversampling of a galaxy's real-space extent (cubic
        B-spline interpolation; 2 keeps its error well below 1e-3 of the peak).
    max_extent, min_extent : generic path: clip [arcsec] on the real-space extent L of a
        galaxy's prepared grid.
    periods : candidate real-space periods of the output grid [pixels]; each stamp uses the
        smallest one whose wrapped-around light is below ``wrap_tol`` x its peak (cost grows as
        period^2).
    wrap_tol : see ``periods``.
    k_eps : frequencies where |PSF x pixel| < k_eps are dropped.
    cache_size : generic prepared galaxies kept per source (LRU; they hold MB-sized grids).
    analytic_cache_size : analytic prepared galaxies kept per source (LRU; ~1 kB each).
    chunk_elements : analytic evaluation works on blocks of about this many (stamp, k) values.
    device, dtype : torch device and real dtype of the per-batch computation.
    """

    analytic: bool = True
    table_size: int = 16384
    table_scale: float = 2.0
    analytic_tol: float = 2e-4
    oversample: float = 2.0
    max_extent: float = 12.0
    min_extent: float = 2.0
    periods: tuple = (48, 56, 64, 72, 80, 96, 112, 128, 160, 192)
    wrap_tol: float = 1e-4
    k_eps: float = 1e-4
    cache_size: int = 2000
    analytic_cache_size: int = 100000
    chunk_elements: int = 1 << 20
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


SETTINGS = TorchRenderSettings()


# ---------------------------------------------------------------------------------------------
# Geometry


def transform_matrices(params, idx=None) -> np.ndarray:
    """Real-space maps A (N, 2, 2) with x_lensed = A x_intrinsic: A = sqrt(mu) S(g) R(theta) M.

    M = diag(-1, 1) when mirrored (GalSim ``transform(-1, 0, 0, 1)``), R a counter-clockwise
    rotation by ``rotation`` [rad], S(g) = [[1+g1, g2], [g2, 1-g1]] / sqrt(1-|g|^2) (GalSim
    ``shear``), mu the magnification (GalSim ``lens`` = shear then ``magnify(mu)``).
    """
    sl = slice(None) if idx is None else idx
    g1 = np.asarray(params.g1, float)[sl]
    g2 = np.asarray(params.g2, float)[sl]
    th = np.asarray(params.rotation, float)[sl]
    mir = np.asarray(params.mirror, bool)[sl]
    mu = np.asarray(params.mu, float)[sl]
    n = len(g1)
    m = np.tile(np.eye(2), (n, 1, 1))
    m[mir, 0, 0] = -1.0
    c, s = np.cos(th), np.sin(th)
    r = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    gsq = g1**2 + g2**2
    if np.any(gsq >= 1):
        raise ValueError("|g| must be < 1 for every stamp")
    sh = np.stack([np.stack([1 + g1, g2], -1), np.stack([g2, 1 - g1], -1)], -2) / np.sqrt(1 - gsq)[:, None, None]
    return np.sqrt(mu)[:, None, None] * (sh @ r @ m)


def _max_stretch(augment) -> float:
    """Upper bound of the largest singular value of A allowed by the augmentation settings."""
    gmax = min(math.sqrt(2.0) * augment.shear_max, 0.99)
    mu_hi = augment.magnification[1] if augment.magnification is not None else 1.0
    return math.sqrt(mu_hi) * (1 + gmax) / math.sqrt(1 - gmax**2)


# ---------------------------------------------------------------------------------------------
# Output k-grid (per renderer geometry; cached)


@dataclass
class _Grid:
    n_out: int  # period in pixels (output FFT size)
    dk: float  # output k spacing [rad / arcsec]
    sel: torch.Tensor  # (P,) flat indices into the (2 n_out, n_out + 1) fine half-plane
    k: torch.Tensor  # (P, 2) [kx, ky] of the kept points [rad / arcsec]
    kx: torch.Tensor  # (n_out + 1,) fine half-plane column frequencies
    ky: torch.Tensor  # (2 n_out,) fine row frequencies (FFT order)
    transfer: torch.Tensor  # (P,) PSF x pixel transfer at the kept points (real)
    k_max: float  # largest |k| kept
    kx2: torch.Tensor  # (P,) k_x^2, k_x k_y, k_y^2 of the kept points (analytic path)
    kxy: torch.Tensor
    ky2: torch.Tensor


_GRIDS: dict = {}


def _psf_transfer(psf, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """PSF Fourier transform on the (ky, kx) grid (real part; the PSF is centred & symmetric)."""
    import galsim

    if isinstance(psf, galsim.Gaussian):
        s = psf.sigma
        return np.exp(-0.5 * s**2 * (kx[None, :] ** 2 + ky[:, None] ** 2))
    kk = np.array([psf.kValue(galsim.PositionD(float(a), float(b))) for b in ky for a in kx])
    return np.real(kk).reshape(len(ky), len(kx))


def _output_grid(renderer, settings: TorchRenderSettings, device, dtype, period: int) -> _Grid:
    p = renderer.pixel_scale
    n = int(period)
    key = (id(renderer.psf), repr(renderer.psf), p, n, settings.k_eps, str(device), dtype)
    if key in _GRIDS:
        return _GRIDS[key]
    m = 2 * n  # fine grid (spacing p / 2): folding it onto n is sub-sampling at pixel centres
    dk = 2 * np.pi / (n * p)
    kx = np.arange(n + 1) * dk
    ky = np.fft.fftfreq(m, d=1.0 / m) * dk
    pix = np.sinc(ky[:, None] * p / (2 * np.pi)) * np.sinc(kx[None, :] * p / (2 * np.pi))
    t = _psf_transfer(renderer.psf, kx, ky) * pix
    # drop the fine grid's Nyquist row/column (always negligible) and everything below k_eps
    keep = np.abs(t) > settings.k_eps * np.abs(t).max()
    keep[:, n] = False
    keep[n, :] = False
    sel = np.flatnonzero(keep.ravel())
    kyy, kxx = np.meshgrid(ky, kx, indexing="ij")
    kpts = np.stack([kxx.ravel()[sel], kyy.ravel()[sel]], -1)
    g = _Grid(
        n_out=n,
        dk=dk,
        sel=torch.as_tensor(sel, device=device),
        k=torch.as_tensor(kpts, dtype=torch.float64, device=device),
        kx=torch.as_tensor(kx, dtype=dtype, device=device),
        ky=torch.as_tensor(ky, dtype=dtype, device=device),
        transfer=torch.as_tensor(t.ravel()[sel], dtype=dtype, device=device),
        k_max=float(np.hypot(kpts[:, 0], kpts[:, 1]).max()),
        kx2=torch.as_tensor(kpts[:, 0] ** 2, dtype=dtype, device=device),
        kxy=torch.as_tensor(kpts[:, 0] * kpts[:, 1], dtype=dtype, device=device),
        ky2=torch.as_tensor(kpts[:, 1] ** 2, dtype=dtype, device=device),
    )
    _GRIDS[key] = g
    return g


# ---------------------------------------------------------------------------------------------
# Generic prepared galaxies (k-grid of GalSim's drawKImage)


@dataclass
class PreparedGalaxy:
    """Generic path: half-plane cubic B-spline coefficients of the Fourier transform of one unlensed galaxy.

    data : (1, 2, ny, nx) real tensor (real, imaginary parts) of the B-spline coefficients of
        F(q) at q_x = (j - 3) dq, q_y = (i - c) dq, c = (ny - 1) / 2.
    dq : grid spacing [rad / arcsec]; q_max : |q| beyond which F is taken as 0.
    period : output period [pixels] that keeps this galaxy's wrapped light below ``wrap_tol``.
    """

    data: torch.Tensor
    dq: float
    q_max: float
    period: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _choose_period(kim: np.ndarray, dq: float, psf_sigma: float, stretch: float, pixel_scale: float,
                   size: int, shift: float, settings: TorchRenderSettings) -> int:
    """Smallest output period [pixels] whose wrapped-around light is below ``wrap_tol``.

    The PSF-smoothed galaxy is brought to real space (source frame); a replica one period away
    reaches the stamp with light from source-frame radii >= (period p - d_stamp) / stretch, with
    d_stamp the largest distance of a stamp pixel from the galaxy centre. The criterion is the
    brightest such light relative to the peak.
    """
    n = kim.shape[0]
    qq = (np.arange(n) - (n - 1) / 2) * dq
    smooth = kim * np.exp(-0.5 * psf_sigma**2 * (qq[None, :] ** 2 + qq[:, None] ** 2))
    img = np.real(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(smooth))))
    step = 2 * np.pi / (n * dq)  # real-space sample spacing [arcsec]
    xx = (np.arange(n) - n // 2) * step
    r = np.hypot(xx[None, :], xx[:, None])
    peak = np.abs(img).max()
    d_stamp = math.sqrt(2.0) * (size / 2 + shift) * pixel_scale
    periods = sorted(int(x) for x in settings.periods)
    for per in periods:
        rad = (per * pixel_scale - d_stamp) / stretch
        outer = r >= rad
        if not outer.any() or np.abs(img[outer]).max() <= settings.wrap_tol * peak:
            return per
    return periods[-1]


def prepare_galaxy(gal, q_need: float, settings: TorchRenderSettings = SETTINGS, device="cpu",
                   dtype=torch.float32, psf_sigma: float = 0.05, stretch: float = 1.4,
                   pixel_scale: float = PIXEL_SCALE, size: int = STAMP_SIZE, shift: float = 3.5) -> PreparedGalaxy:
    """Sample the Fourier transform of GalSim profile ``gal`` for the torch renderer.

    q_need : largest |q| [rad / arcsec] the renderer will ask for. The other arguments (PSF
    sigma [arcsec], largest stretch of the lensing map, pixel scale, stamp size [pixels], largest
    shift [pixels]) only choose the output period (see ``_choose_period``).
    """
    from scipy.ndimage import spline_filter

    extent = min(max(2 * np.pi / gal.stepk, settings.min_extent), settings.max_extent)
    dq = 2 * np.pi / (settings.oversample * extent)
    q_max = min(q_need, 2.0 * gal.maxk)
    nq = int(math.ceil(q_max / dq)) + 4
    kim = gal.drawKImage(nx=2 * nq + 1, ny=2 * nq + 1, scale=dq).array  # k = 0 at [nq, nq]
    period = _choose_period(kim, dq, psf_sigma, stretch, pixel_scale, size, shift, settings)
    coef = [spline_filter(part, order=3, mode="mirror") for part in (kim.real, kim.imag)]
    arr = np.stack([c[:, nq - 3:] for c in coef])[None]
    return PreparedGalaxy(torch.as_tensor(np.ascontiguousarray(arr), dtype=dtype, device=device), dq, q_max,
                          period)


def _bspline_axis(x: torch.Tensor):
    """Positions and weights of the two bilinear fetches that make a cubic B-spline (one axis)."""
    i = torch.floor(x)
    t = x - i
    t2, t3 = t * t, t * t * t
    w0 = (1 - t) ** 3 / 6
    w1 = (3 * t3 - 6 * t2 + 4) / 6
    w2 = (-3 * t3 + 3 * t2 + 3 * t + 1) / 6
    w3 = t3 / 6
    g0, g1 = w0 + w1, w2 + w3
    return i - 1 + w1 / g0, i + 1 + w3 / g1, g0, g1


def _sample(prep: PreparedGalaxy, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic B-spline samples (real, imag) of F at the points q (..., 2) [rad / arcsec].

    Uses F(-q) = conj F(q) for q_x < 0 and four bilinear ``grid_sample`` fetches per point.
    """
    conj = q[..., 0] < 0
    q = torch.where(conj[..., None], -q, q)
    _, _, ny, nx = prep.data.shape
    u = q[..., 0] / prep.dq + 3.0  # column index
    v = q[..., 1] / prep.dq + (ny - 1) / 2.0  # row index
    u0, u1, gu0, gu1 = _bspline_axis(u)
    v0, v1, gv0, gv1 = _bspline_axis(v)
    su, sv = 2.0 / (nx - 1), 2.0 / (ny - 1)
    xs = torch.stack([u0, u1, u0, u1]) * su - 1
    ys = torch.stack([v0, v0, v1, v1]) * sv - 1
    grid = torch.stack([xs, ys], -1).reshape(1, -1, 1, 2)
    out = torch.nn.functional.grid_sample(prep.data, grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)
    out = out[0, :, :, 0].reshape(2, 4, *q.shape[:-1])
    w = torch.stack([gu0 * gv0, gu1 * gv0, gu0 * gv1, gu1 * gv1])
    re = (out[0] * w).sum(0)
    im = (out[1] * w).sum(0)
    im = torch.where(conj, -im, im)
    outside = (q[..., 0] ** 2 + q[..., 1] ** 2) > prep.q_max**2
    re = re.masked_fill(outside, 0.0)
    im = im.masked_fill(outside, 0.0)
    return re, im


# ---------------------------------------------------------------------------------------------
# Radial tables of round unit profiles (analytic path)


@dataclass
class _RadialTable:
    """One round, unit-flux, unit-size profile type.

    kvals : (table_size,) U(kappa_i), kappa_i = scale u_i / (1 - u_i), u_i = i / (table_size - 1)
        (the last entry, kappa = inf, is 0).
    log_r, xvals : real-space profile (unit flux) at radii exp(log_r) [units of the size].
    log_rho, peak : central value of the profile smoothed by a Gaussian of sigma exp(log_rho).
    """

    kvals: np.ndarray
    log_r: np.ndarray
    xvals: np.ndarray
    log_rho: np.ndarray
    peak: np.ndarray


_TABLE_IDS: dict = {}  # (kind, n, gsparams, table_size, table_scale) -> index in _TABLES
_TABLE_KEYS: list = []  # index -> key: plans name tables by key, so they travel between processes
_TABLES: list = []
_TABLE_STACK: dict = {}  # (n_tables, device, dtype) -> (n_tables * table_size,) tensor


def _kappa_grid(size: int, scale: float) -> np.ndarray:
    u = np.arange(size) / (size - 1)
    with np.errstate(divide="ignore"):
        return scale * u / (1.0 - u)


def _radial_table_id(kind: str, n: float, gsparams, settings: TorchRenderSettings) -> int:
    """Index of the radial table of the unit profile ``kind`` ('sersic' with index n, 'exp',
    'gauss'), built on first use from GalSim's kValue / xValue."""
    import galsim

    key = (kind, n, gsparams, int(settings.table_size), float(settings.table_scale))
    if key in _TABLE_IDS:
        return _TABLE_IDS[key]
    if kind == "sersic":
        unit = galsim.Sersic(n=n, half_light_radius=1.0, gsparams=gsparams)
    elif kind == "exp":
        unit = galsim.Exponential(scale_radius=1.0, gsparams=gsparams)
    elif kind == "gauss":
        unit = galsim.Gaussian(sigma=1.0, gsparams=gsparams)
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    kap = _kappa_grid(int(settings.table_size), float(settings.table_scale))
    # GalSim's vectorised k-image drawing on 1-row images, one octave of kappa per image with
    # 1024 uniform samples (relative spacing <= 1e-3), then linear interpolation onto the table
    # grid (relative error ~1e-7); U = 0 beyond kappa = 2^14 (never reached by the stamps)
    samples_k, samples_u = [np.zeros(1)], [np.ones(1)]
    lo = -7
    h = 2.0**lo / 1024
    im = galsim.ImageCD(galsim.BoundsI(1, 1023, 0, 0), scale=h)
    unit._drawKImage(im)
    samples_k.append(np.arange(1, 1024) * h)
    samples_u.append(im.array[0].real.copy())
    for j in range(lo, 14):
        h = 2.0**j / 1024
        im = galsim.ImageCD(galsim.BoundsI(1024, 2047, 0, 0), scale=h)
        unit._drawKImage(im)
        samples_k.append(np.arange(1024, 2048) * h)
        samples_u.append(im.array[0].real.copy())
    kv = np.interp(kap, np.concatenate(samples_k), np.concatenate(samples_u), right=0.0)
    kv[-1] = 0.0
    pos = galsim.PositionD
    log_r = np.linspace(np.log(1e-4), np.log(2e3), 800)
    xv = np.array([unit._xValue(pos(float(r), 0.0)) for r in np.exp(log_r)])
    xv = np.maximum.accumulate(xv[::-1])[::-1]  # monotone envelope: max light at radius >= r
    log_rho = np.linspace(np.log(1e-3), np.log(1e2), 300)
    kk, uu = kap[:-1], kv[:-1]
    w = np.gradient(kk) * kk * uu / (2 * np.pi)
    peak = np.array([np.sum(w * np.exp(-0.5 * (kk * rho) ** 2)) for rho in np.exp(log_rho)])
    _TABLES.append(_RadialTable(kv, log_r, xv, log_rho, peak))
    _TABLE_KEYS.append(key)
    _TABLE_IDS[key] = len(_TABLES) - 1
    return _TABLE_IDS[key]


def _table_stack(device, dtype) -> torch.Tensor:
    """All radial tables as one complex tensor of (U_i, U_{i+1} - U_i) pairs (last step 0)."""
    key = (len(_TABLES), str(device), dtype)
    if key not in _TABLE_STACK:
        _TABLE_STACK.clear()
        ctype = torch.complex64 if dtype == torch.float32 else torch.complex128
        kv = np.stack([t.kvals for t in _TABLES])
        step = np.diff(kv, axis=1, append=0.0)
        _TABLE_STACK[key] = torch.as_tensor((kv + 1j * step).ravel(), dtype=ctype, device=device)
    return _TABLE_STACK[key]


def _lookup_np(tid: int, kappa: np.ndarray, settings: TorchRenderSettings) -> np.ndarray:
    """U(kappa) of table ``tid`` by the same linear interpolation as the torch path."""
    n = int(settings.table_size)
    pos = kappa / (kappa + settings.table_scale) * (n - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    t = pos - i0
    kv = _TABLES[tid].kvals
    return kv[i0] + t * (kv[i0 + 1] - kv[i0])


# ---------------------------------------------------------------------------------------------
# Analytic galaxies


@dataclass
class AnalyticGalaxy:
    """A galaxy as radial components plus point sources (source frame, before lensing).

    tid : (K,) radial table ids; jh : (K, 2, 2) real-space map of each component (intrinsic
    shear/dilation times its size [arcsec]) so that F_c(q) = w_c U_c(|jh_c^T q|); w : (K,) fluxes.
    knots_xy : (M, 2) point-source positions [arcsec]; knots_w : (M,) their fluxes.
    """

    tid: np.ndarray
    jh: np.ndarray
    w: np.ndarray
    knots_xy: np.ndarray
    knots_w: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.tid, self.jh, self.w, self.knots_xy, self.knots_w))

    def kvalue(self, k: np.ndarray, settings: TorchRenderSettings) -> np.ndarray:
        """F(k) at the points k (n, 2) [rad / arcsec] (for checks)."""
        out = np.zeros(len(k), complex)
        for tid, jh, w in zip(self.tid, self.jh, self.w):
            out += w * _lookup_np(int(tid), np.hypot(*(k @ jh).T), settings)
        if len(self.knots_w):
            out += np.exp(-1j * (k @ self.knots_xy.T)) @ self.knots_w
        return out


class _NotAnalytic(Exception):
    pass


def _decompose(obj, jac, mult, comps, knots, settings):
    import galsim

    if isinstance(obj, galsim.Transformation):
        off = obj.offset
        if off.x != 0 or off.y != 0:
            raise _NotAnalytic("shifted component")
        j = np.asarray(obj.jac, float)
        _decompose(obj.original, jac @ j, mult * float(obj.flux_ratio) * abs(np.linalg.det(j)), comps, knots,
                   settings)
    elif isinstance(obj, galsim.Sum):
        for o in obj.obj_list:
            _decompose(o, jac, mult, comps, knots, settings)
    elif isinstance(obj, galsim.Sersic):
        if obj.trunc != 0:
            raise _NotAnalytic("truncated Sersic")
        tid = _radial_table_id("sersic", float(obj.n), obj.gsparams, settings)
        comps.append((tid, jac * float(obj.half_light_radius), mult * float(obj.flux)))
    elif isinstance(obj, galsim.Exponential):
        tid = _radial_table_id("exp", 0.0, obj.gsparams, settings)
        comps.append((tid, jac * float(obj.scale_radius), mult * float(obj.flux)))
    elif isinstance(obj, galsim.Gaussian):
        tid = _radial_table_id("gauss", 0.0, obj.gsparams, settings)
        comps.append((tid, jac * float(obj.sigma), mult * float(obj.flux)))
    elif isinstance(obj, galsim.RandomKnots):
        pts = np.asarray(obj.points, float).reshape(-1, 2)
        knots.append((pts @ jac.T, np.full(len(pts), mult * float(obj.flux) / len(pts))))
    else:
        raise _NotAnalytic(type(obj).__name__)


def analyze_galaxy(gal, settings: TorchRenderSettings = SETTINGS, allow_knots: bool = True):
    """``AnalyticGalaxy`` of GalSim profile ``gal``, or None when it is not a (checked) sum of
    radial profiles and point sources."""
    comps, knots = [], []
    try:
        _decompose(gal, np.eye(2), 1.0, comps, knots, settings)
    except _NotAnalytic as err:
        log.debug("generic torch path for %s: %s", type(gal).__name__, err)
        return None
    if (knots and not allow_knots) or not comps:
        return None
    an = AnalyticGalaxy(
        tid=np.array([c[0] for c in comps], np.int64),
        jh=np.array([c[1] for c in comps], float).reshape(-1, 2, 2),
        w=np.array([c[2] for c in comps], float),
        knots_xy=np.concatenate([k[0] for k in knots]) if knots else np.zeros((0, 2)),
        knots_w=np.concatenate([k[1] for k in knots]) if knots else np.zeros(0),
    )
    # check against GalSim at a few frequencies spanning the galaxy's Fourier transform
    import galsim

    size = max(float(np.sqrt(abs(np.linalg.det(j)))) for j in an.jh)
    kk = np.array([0.7, 2.5, 9.0]) / size
    ang = np.array([0.3, 1.9, 4.0])
    pts = np.stack([kk * np.cos(ang), kk * np.sin(ang)], -1)
    ref = np.array([gal.kValue(galsim.PositionD(float(a), float(b))) for a, b in pts])
    flux = float(gal.flux)
    if not np.isfinite(flux) or flux == 0:
        return None
    err = np.abs(an.kvalue(pts, settings) - ref).max() / abs(flux)
    if not err <= settings.analytic_tol:
        log.debug("generic torch path: analytic decomposition off by %.2e of the flux", err)
        return None
    return an


def analytic_from_components(desc: dict, gsparams=None, settings: TorchRenderSettings = SETTINGS,
                             allow_knots: bool = True):
    """``AnalyticGalaxy`` of a source's own description (``ParametricSource.components``: radial
    components ``(kind, n, J [arcsec], flux)`` and knots), or None with knots when they are not
    allowed (a non-Gaussian PSF). No GalSim profile is built and no check frequencies are
    evaluated: the description is exact by construction (tested against :func:`analyze_galaxy`)."""
    import galsim

    if len(desc["knots_w"]) and not allow_knots:
        return None
    gsp = galsim.GSParams.check(gsparams)
    radial = desc["radial"]
    return AnalyticGalaxy(
        tid=np.array([_radial_table_id(kind, float(n) if kind == "sersic" else 0.0, gsp, settings)
                      for kind, n, _, _ in radial], np.int64),
        jh=np.array([j for _, _, j, _ in radial], float).reshape(-1, 2, 2),
        w=np.array([f for _, _, _, f in radial], float),
        knots_xy=np.asarray(desc["knots_xy"], float).reshape(-1, 2),
        knots_w=np.asarray(desc["knots_w"], float),
    )


class _Cache:
    """Per-source LRU caches of prepared galaxies (module level; never pickled into workers)."""

    def __init__(self):
        self._by_source = weakref.WeakKeyDictionary()

    def get(self, source, key, factory, maxsize, bucket="grid"):
        per = self._by_source.get(source)
        if per is None:
            per = {}
            self._by_source[source] = per
        d = per.setdefault(bucket, OrderedDict())
        if key in d:
            d.move_to_end(key)
            return d[key]
        val = factory()
        d[key] = val
        while len(d) > maxsize:
            d.popitem(last=False)
        return val

    def clear(self):
        self._by_source = weakref.WeakKeyDictionary()


CACHE = _Cache()


def clear_caches(tables: bool = False) -> None:
    """Forget prepared galaxies (and, with ``tables=True``, the radial tables and output grids),
    e.g. to measure preparation costs."""
    CACHE.clear()
    if tables:
        _TABLE_IDS.clear()
        _TABLE_KEYS.clear()
        _TABLES.clear()
        _TABLE_STACK.clear()
        _GRIDS.clear()


def _psf_sigma(psf) -> float:
    import galsim

    if isinstance(psf, galsim.Gaussian):
        return float(psf.sigma)
    return float(psf.calculateFWHM()) / 2.3548200450309493


def _q_need(renderer, settings, device, dtype) -> float:
    k_max = max(_output_grid(renderer, settings, device, dtype, per).k_max for per in settings.periods)
    return k_max * _max_stretch(renderer.augment) * 1.001


def _prepare_generic(renderer, gid, settings, device, dtype) -> PreparedGalaxy:
    q_need = _q_need(renderer, settings, device, dtype)
    aug = renderer.augment
    key = (int(gid), round(q_need, 6), settings.oversample, settings.max_extent, settings.min_extent,
           tuple(settings.periods), settings.wrap_tol, renderer.stamp_size, aug.shift, str(device), dtype)
    return CACHE.get(
        renderer.source, key,
        lambda: prepare_galaxy(renderer.source.galaxy(int(gid)), q_need, settings, device, dtype,
                               _psf_sigma(renderer.psf), _max_stretch(aug), renderer.pixel_scale,
                               renderer.stamp_size, aug.shift),
        settings.cache_size, bucket="grid",
    )


def prepared(renderer, gid: int, settings: TorchRenderSettings = SETTINGS, device="cpu", dtype=torch.float32):
    """The cached prepared galaxy ``gid`` of ``renderer.source``: an ``AnalyticGalaxy`` when the
    profile decomposes into radial components (and knots, with a Gaussian PSF), else a
    ``PreparedGalaxy`` (generic k-grid)."""
    import galsim

    if settings.analytic:
        gauss = isinstance(renderer.psf, galsim.Gaussian)
        key = (int(gid), int(settings.table_size), float(settings.table_scale), float(settings.analytic_tol), gauss)
        src = renderer.source
        if callable(getattr(src, "components", None)):  # described without a GalSim object
            factory = lambda: analytic_from_components(src.components(int(gid)), src.gsparams, settings,  # noqa: E731
                                                       allow_knots=gauss)
        else:
            factory = lambda: analyze_galaxy(src.galaxy(int(gid)), settings, allow_knots=gauss)  # noqa: E731
        an = CACHE.get(src, key, factory, settings.analytic_cache_size, bucket="analytic")
        if an is not None:
            return an
    return _prepare_generic(renderer, gid, settings, device, dtype)


# ---------------------------------------------------------------------------------------------
# Drawing


def draw_batch(renderer, params, size: int, settings: TorchRenderSettings | None = None):
    """Draw noiseless stamps like the GalSim backend (before mask / flux factor / noise).

    ``execute_plan(plan_batch(...))`` on ``settings.device``. Returns (images (N, size, size)
    float64 numpy, failures list of (row, message)); a failed row holds NaN.
    """
    settings = settings or SETTINGS
    plan = plan_batch(renderer, params, size, settings)
    out = execute_plan(renderer, plan, settings.device, settings).cpu().numpy()
    failures = list(plan["failures"])
    failed = {i for i, _ in failures}
    for i in np.flatnonzero(~np.all(np.isfinite(out), axis=(1, 2))):
        if int(i) not in failed:
            failures.append((int(i), "non-finite pixels in the torch renderer"))
    return out, failures


def plan_batch(renderer, params, size: int, settings: TorchRenderSettings | None = None) -> dict:
    """The host stage of drawing ``params``: prepare the galaxies (cached per process), choose
    each stamp's output period, and reduce every analytic stamp to the few numbers the device
    stage needs (per component: the quadratic form of kappa^2 [arcsec^2], flux, table; per
    stamp: the centroid phases [rad]; per knot: its pixel-integrated profile along x and y).
    Generic (k-grid) galaxies are drawn here on ``settings.device``.

    The plan holds numpy arrays and plain values only, names radial tables by key (not by this
    process's index), and so can be made in a DataLoader worker and drawn by
    :func:`execute_plan` on the training device. Keys: ``n``, ``size``, ``ok`` (N,) bool,
    ``failures`` [(row, message)], ``table_keys``, ``groups`` (one per output period),
    ``knots``, ``generic_rows`` / ``generic_images``.
    """
    settings = settings or SETTINGS
    device = torch.device(settings.device)
    n = len(params)
    if size > min(settings.periods):
        raise ValueError(f"stamp size {size} exceeds the smallest torch renderer period {min(settings.periods)}; "
                         "raise SETTINGS.periods")
    plan = {"n": n, "size": int(size), "ok": np.zeros(n, bool), "failures": [], "table_keys": [], "groups": [],
            "knots": None, "generic_rows": np.zeros(0, np.int64), "generic_images": np.zeros((0, size, size))}
    if n == 0:
        return plan
    a = transform_matrices(params)  # (N, 2, 2)
    gid = np.asarray(params.galaxy_id, np.int64)
    dx = np.asarray(params.dx, float)
    dy = np.asarray(params.dy, float)
    preps = {}
    for g in np.unique(gid):
        try:
            preps[int(g)] = prepared(renderer, int(g), settings, device, settings.dtype)
        except Exception as err:  # a galaxy GalSim cannot prepare becomes a recorded failure
            for i in np.flatnonzero(gid == g):
                plan["failures"].append((int(i), f"{type(err).__name__}: {err}"))
    ok = np.array([int(g) in preps for g in gid])
    plan["ok"] = ok
    is_an = np.array([isinstance(preps.get(int(g)), AnalyticGalaxy) for g in gid])
    rows_an = np.flatnonzero(ok & is_an)
    if len(rows_an):
        parts = _analytic_components(renderer, rows_an, a, gid, preps, dx, dy, size, settings)
        used, parts["tid"] = np.unique(parts["tid"], return_inverse=True)
        plan["table_keys"] = [_TABLE_KEYS[int(t)] for t in used]
        for per in np.unique(parts["period"]):
            plan["groups"].append(_analytic_group(parts, rows_an[parts["period"] == per], int(per), dx, dy,
                                                  renderer.pixel_scale, size))
        plan["knots"] = _knot_plan(renderer, rows_an, a, gid, preps, dx, dy, size)
    rows_g = np.flatnonzero(ok & ~is_an)
    if len(rows_g):
        images = np.zeros((len(rows_g), size, size))
        period = np.array([preps[int(gid[i])].period for i in rows_g])
        for per in np.unique(period):
            grid = _output_grid(renderer, settings, device, settings.dtype, int(per))
            loc = np.flatnonzero(period == per)
            vals = _generic_values(grid, rows_g[loc], a, gid, preps, device, settings.dtype)
            phases = _phases(dx[rows_g[loc]], dy[rows_g[loc]], renderer.pixel_scale, size, int(per))
            images[loc] = _assemble(grid, vals, phases, size, device, settings.dtype).cpu().numpy()
        plan["generic_rows"], plan["generic_images"] = rows_g, images
    return plan


def plan_tensors(plan: dict) -> dict:
    """The plan with its arrays as torch tensors (complex phases as complex64), ready for a
    DataLoader and ``batch_to_device``; ``failures`` is left out (count them where the plan is
    made)."""
    def conv(v):
        if isinstance(v, np.ndarray):
            return torch.as_tensor(v.astype(np.complex64) if np.iscomplexobj(v) else v)
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in plan.items() if k != "failures"}


def execute_plan(renderer, plan: dict, device=None, settings: TorchRenderSettings | None = None) -> torch.Tensor:
    """The device stage: noiseless stamps (N, size, size) float64 on ``device`` (default
    ``settings.device``) from a :func:`plan_batch` plan (numpy arrays or tensors on any device);
    rows that failed to prepare are NaN. The radial tables named by the plan are built here on
    first use (this process's own indices)."""
    settings = settings or SETTINGS
    device = torch.device(device if device is not None else settings.device)
    dtype = settings.dtype
    n, size = int(plan["n"]), int(plan["size"])
    out = torch.full((n, size, size), float("nan"), dtype=torch.float64, device=device)
    ok = torch.as_tensor(plan["ok"], device=device)
    out[ok] = 0.0
    if plan["groups"]:
        ids = []
        for key in plan["table_keys"]:
            kind, index, gsparams, table_size, table_scale = key
            if (int(table_size), float(table_scale)) != (int(settings.table_size), float(settings.table_scale)):
                raise ValueError(f"plan made with radial tables of size {table_size}, scale {table_scale}; this process "
                                 f"uses {settings.table_size}, {settings.table_scale} (SETTINGS changed between them)")
            ids.append(_radial_table_id(kind, index, gsparams, settings))
        tables = torch.as_tensor(np.asarray(ids, np.int64) * int(settings.table_size), device=device)
        for grp in plan["groups"]:
            grid = _output_grid(renderer, settings, device, dtype, int(grp["period"]))
            vals = _analytic_values(grp, grid, tables, settings, device, dtype)
            rows = torch.as_tensor(grp["rows"], device=device)
            out[rows] = _assemble(grid, vals, grp["phases"], size, device, dtype).to(torch.float64)
        kn = plan["knots"]
        if kn is not None and len(kn["row"]):
            ex = torch.as_tensor(kn["ex"], dtype=torch.float64, device=device)
            ey = torch.as_tensor(kn["ey"], dtype=torch.float64, device=device)
            out.index_add_(0, torch.as_tensor(kn["row"], device=device), ey[:, :, None] * ex[:, None, :])
    if len(plan["generic_rows"]):
        out[torch.as_tensor(plan["generic_rows"], device=device)] = torch.as_tensor(
            plan["generic_images"], dtype=torch.float64, device=device)
    return out


def _analytic_components(renderer, rows, a, gid, preps, dx, dy, size, settings) -> dict:
    """Per-component arrays of the analytic stamps ``rows`` and each stamp's output period.

    Returns dict with ``row`` (index into ``rows``), ``tid``, ``m`` (2x2 stamp-frame map
    A J_c h_c), ``w`` (flux x |det A|) per component, and ``period`` (len(rows),).
    """
    counts = np.array([len(preps[int(gid[i])].tid) for i in rows])
    row = np.repeat(np.arange(len(rows)), counts)
    tid = np.concatenate([preps[int(gid[i])].tid for i in rows])
    jh = np.concatenate([preps[int(gid[i])].jh for i in rows])
    w = np.concatenate([preps[int(gid[i])].w for i in rows])
    arows = a[rows]
    m = arows[row] @ jh
    w = w * np.abs(np.linalg.det(arows))[row]

    # output period: smallest one whose wrapped-around light <= wrap_tol x PSF-smoothed peak
    p = renderer.pixel_scale
    sig = _psf_sigma(renderer.psf)
    det_m = np.abs(np.linalg.det(m))
    smax = np.linalg.norm(m, ord=2, axis=(1, 2))
    peak = np.zeros(len(rows))
    periods = np.array(sorted(int(x) for x in settings.periods))
    d_stamp = p * np.hypot(size / 2 + np.abs(dx[rows]), size / 2 + np.abs(dy[rows]))
    light = np.zeros((len(periods), len(rows)))
    for t in np.unique(tid):
        c = np.flatnonzero(tid == t)
        tab = _TABLES[int(t)]
        rho = np.log(sig / np.sqrt(det_m[c]))
        pk = w[c] / det_m[c] * np.interp(rho, tab.log_rho, tab.peak)
        np.add.at(peak, row[c], np.abs(pk))
        dist = np.maximum(periods[:, None] * p - d_stamp[row[c]][None, :] - 3 * sig, 1e-30) / smax[c][None, :]
        lt = np.abs(w[c] / det_m[c])[None, :] * np.interp(np.log(dist), tab.log_r, tab.xvals, left=tab.xvals[0],
                                                          right=0.0)
        for j in range(len(periods)):
            np.add.at(light[j], row[c], lt[j])
    good = light <= settings.wrap_tol * peak[None, :]
    first = np.where(good.any(0), good.argmax(0), len(periods) - 1)
    return {"row": row, "tid": tid, "m": m, "w": w, "period": periods[first], "rows": rows}


def _analytic_group(parts, sel, period, dx, dy, p, size) -> dict:
    """Plan arrays of the analytic stamps ``sel`` (rows of the batch, one output period)."""
    pos = np.searchsorted(parts["rows"], sel)  # local indices of the selected stamps
    loc = np.full(len(parts["rows"]), -1)
    loc[pos] = np.arange(len(sel))
    cl = np.flatnonzero(loc[parts["row"]] >= 0)
    m = parts["m"][cl]
    q = m @ np.swapaxes(m, 1, 2)  # Q = M M^T: kappa^2 = k^T Q k
    return {"period": int(period), "rows": np.asarray(sel, np.int64), "crow": loc[parts["row"][cl]].astype(np.int64),
            "coef": np.stack([q[:, 0, 0], 2 * q[:, 0, 1], q[:, 1, 1]], 1), "w": parts["w"][cl],
            "tid": parts["tid"][cl].astype(np.int64), "phases": _phases(dx[sel], dy[sel], p, size, period)}


def _analytic_values(grp, grid, tables, settings, device, dtype) -> torch.Tensor:
    """F'(k) T(k) (real) of a plan group's stamps on the grid's kept points: (stamps, P + 1),
    the last column zero (folding). ``tables``: offset of each plan table in the table stack."""
    coef = torch.as_tensor(grp["coef"], device=device).to(dtype)
    w = torch.as_tensor(grp["w"], device=device).to(dtype)
    crow_t = torch.as_tensor(grp["crow"], device=device)
    base = tables[torch.as_tensor(grp["tid"], device=device)].to(torch.int32)
    nt = int(settings.table_size)
    table = _table_stack(device, dtype)
    npts = grid.k.shape[0]
    out = torch.zeros((len(grp["rows"]), npts + 1), dtype=dtype, device=device)
    step = max(1, int(settings.chunk_elements) // max(npts, 1))
    scale = float(settings.table_scale)
    for s in range(0, coef.shape[0], step):
        e = min(s + step, coef.shape[0])
        c = coef[s:e]
        kap = c[:, 0:1] * grid.kx2
        kap.addcmul_(c[:, 1:2], grid.kxy)
        kap.addcmul_(c[:, 2:3], grid.ky2)
        kap.clamp_(min=0.0).sqrt_()  # (the form is positive definite; guard float rounding)
        # u = kappa / (kappa + scale) on a uniform table of nt points; each table entry holds
        # (U_i, U_{i+1} - U_i) as one complex number, so linear interpolation is one gather
        pos_ = kap.div_(kap + scale).mul_(nt - 1)
        idx = pos_.to(torch.int32).add_(base[s:e, None])
        frac = pos_.frac_()
        pair = table.index_select(0, idx.view(-1)).view(idx.shape)
        val = torch.addcmul(pair.real, pair.imag, frac).mul_(w[s:e, None])
        out[:, :npts].index_add_(0, crow_t[s:e], val)
    out[:, :npts] *= grid.transfer
    return out


def _generic_values(grid, sel, a, gid, preps, device, dtype) -> torch.Tensor:
    """det A F(A^T k) T(k) (complex) of the generic stamps ``sel`` on the grid's kept points."""
    ctype = torch.complex64 if dtype == torch.float32 else torch.complex128
    at = torch.as_tensor(a[sel], dtype=torch.float64, device=device)
    det = torch.as_tensor(np.abs(np.linalg.det(a[sel])), dtype=dtype, device=device)
    out = torch.zeros((len(sel), grid.k.shape[0] + 1), dtype=ctype, device=device)  # last column: 0
    g_sel = gid[sel]
    for g in np.unique(g_sel):
        loc = torch.as_tensor(np.flatnonzero(g_sel == g), device=device)
        q = torch.einsum("pi,nij->npj", grid.k, at[loc]).to(dtype)  # q = A^T k
        re, im = _sample(preps[int(g)], q)
        out[loc, :-1] = torch.complex(re, im) * (grid.transfer * det[loc, None])
    return out


def _fold_index(grid, device) -> torch.Tensor:
    """(n_out * (n_out // 2 + 1) * 4,) indices into the kept points (P = zero) of the four
    fine frequencies folded onto each output cell, in the order a0, a1, a2, a3 (see
    ``_assemble``); cached on the grid."""
    cached = getattr(grid, "_fold", None)
    if cached is not None:
        return cached
    n_out = grid.n_out
    nh = n_out // 2
    npts = grid.sel.numel()
    lut = np.full(2 * n_out * (n_out + 1), npts, np.int64)  # fine half plane -> kept index
    lut[grid.sel.cpu().numpy()] = np.arange(npts)
    lut = lut.reshape(2 * n_out, n_out + 1)
    jy = np.arange(n_out)[:, None]
    jx = np.arange(nh + 1)[None, :]
    m = 2 * n_out
    parts = [
        lut[jy, jx],  # a0: (j_y, j_x)
        lut[jy + n_out, jx],  # a1: (j_y - n_out, j_x)
        lut[(-jy) % m, n_out - jx],  # a2: -(j_y, j_x - n_out), conjugated
        lut[(n_out - jy) % m, n_out - jx],  # a3: -(j_y - n_out, j_x - n_out), conjugated
    ]
    idx = torch.as_tensor(np.stack(parts, -1).reshape(-1), device=device)
    grid._fold = idx
    return idx


def _phases(dx, dy, p: float, size: int, n_out: int) -> dict:
    """Centroid phases of stamps of period ``n_out`` (see :func:`_assemble`): ``w`` (n, 4) and
    ``px`` (n, n_out / 2 + 1), ``py`` (n, n_out), complex. x0, y0: centre of output pixel (0, 0)
    relative to the profile centre [arcsec]."""
    c = (size - 1) / 2.0
    x0 = (-c - np.asarray(dx, float)) * p
    y0 = (-c - np.asarray(dy, float)) * p
    wx = np.exp(-2j * np.pi * x0 / p)
    wy = np.exp(-2j * np.pi * y0 / p)
    dk = 2 * np.pi / (n_out * p)
    kx = np.arange(n_out // 2 + 1) * dk
    ky = np.arange(n_out) * dk
    return {"w": np.stack([np.ones(len(x0)), wy, wx, wx * wy], 1), "px": np.exp(1j * x0[:, None] * kx[None, :]),
            "py": np.exp(1j * y0[:, None] * ky[None, :])}


def _assemble(grid, vals, phases, size, device, dtype) -> torch.Tensor:
    """Images (n, size, size) in ``dtype`` on ``device`` from the values (n, P + 1) at the grid's
    kept points (the last column is zero) and the stamps' :func:`_phases`.

    The fine half plane (rows: 2 n_out frequencies in FFT order, columns k_x = 0..n_out dk) is
    folded onto the pixel grid's half plane (n_out rows, n_out / 2 + 1 columns): output cell
    (j_y, j_x) receives the fine frequencies (j_y - a n_out, j_x - b n_out) dk, a, b in {0, 1};
    those with k_x < 0 are read at -k (conjugated). Their shift phases exp(i k . x0) differ from
    the cell's base phase exp(i (j_x x0 + j_y y0) dk) by the per-stamp constants w_y^a w_x^b,
    w = exp(-i 2 pi x0 / p), so the fold is one batched matrix product and the phase is applied
    once on the small folded grid.
    """
    n = vals.shape[0]
    n_out = grid.n_out
    nh = n_out // 2
    cells = n_out * (nh + 1)
    gathered = vals.index_select(1, _fold_index(grid, device)).view(n, cells, 4)
    ctype = torch.complex64 if dtype == torch.float32 else torch.complex128
    w = torch.as_tensor(phases["w"], device=device).to(ctype)  # (n, 4)
    if vals.is_complex():
        gathered = torch.cat([gathered[..., :2], gathered[..., 2:].conj()], -1)
        folded = torch.bmm(gathered, w[:, :, None])[..., 0]
    else:
        coef = torch.stack([w.real, w.imag], -1).to(dtype)  # (n, 4, 2)
        folded = torch.view_as_complex(torch.bmm(gathered, coef).contiguous())
    folded = folded.view(n, n_out, nh + 1)
    px = torch.as_tensor(phases["px"], device=device).to(ctype)
    py = torch.as_tensor(phases["py"], device=device).to(ctype)
    folded = folded * (py[:, :, None] * px[:, None, :])
    return torch.fft.irfft2(folded, s=(n_out, n_out))[:, :size, :size]


def _knot_plan(renderer, rows, a, gid, preps, dx, dy, size) -> dict:
    """The point sources of analytic galaxies in real space (Gaussian PSF x pixel), separable:
    knot j adds ``ey[j][:, None] * ex[j][None, :]`` to stamp ``row[j]`` (flux in ``ey``)."""
    from scipy.special import ndtr

    p = renderer.pixel_scale
    sig = _psf_sigma(renderer.psf)
    c = (size - 1) / 2.0
    edges = (np.arange(size + 1) - 0.5 - c) * p
    row, ex, ey = [], [], []
    for i in rows:
        an = preps[int(gid[i])]
        if not len(an.knots_w):
            continue
        xy = an.knots_xy @ a[i].T  # (M, 2) lensed positions [arcsec]
        w = an.knots_w * abs(np.linalg.det(a[i]))
        ex.append(np.diff(ndtr((edges[None, :] - dx[i] * p - xy[:, 0:1]) / sig), axis=1))  # (M, size)
        ey.append(np.diff(ndtr((edges[None, :] - dy[i] * p - xy[:, 1:2]) / sig), axis=1) * w[:, None])
        row.append(np.full(len(w), int(i)))
    if not row:
        return {"row": np.zeros(0, np.int64), "ex": np.zeros((0, size)), "ey": np.zeros((0, size))}
    return {"row": np.concatenate(row), "ex": np.concatenate(ex), "ey": np.concatenate(ey)}
