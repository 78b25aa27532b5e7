"""Batched Fourier-space renderer in torch (``backend='torch'``), checked against GalSim.

``draw_batch(renderer, params, size)`` returns the same images as the GalSim backend
(``renderer.draw_galsim(params, i, size).array`` for every row): the noiseless, mirrored,
rotated, lensed galaxy convolved with the PSF and the pixel, drawn on a ``size x size`` grid of
``renderer.pixel_scale`` [arcsec / pixel] with the profile centre at the 0-indexed pixel
((size-1)/2 + dx, (size-1)/2 + dy) (GalSim's ``true_center`` plus ``offset``). Masking, flux
factor and noise are the renderer's shared post-processing and are not applied here.

Method
------
1. Preparation, once per galaxy (cached per source object and galaxy id, in this process only):
   GalSim samples the Fourier transform F(q) of the unlensed galaxy profile on a square grid
   (``gal.drawKImage``) with spacing dq = 2 pi / (oversample * L) [rad / arcsec], where L is
   the galaxy's real-space extent (GalSim's ``2 pi / stepk``, capped at ``max_extent``
   arcsec) and out to |q| = Q, the largest frequency any allowed lensing/magnification can map
   onto a frequency the PSF and pixel let through. Only the half plane q_x >= 0 (plus two
   columns for interpolation taps) is kept: F(-q) = conj F(q) for a real profile.
2. Per batch: the mirror M = diag(-1, 1), rotation R(theta), shear S(g) and magnification are
   one linear map of real-space coordinates, A = sqrt(mu) S(g) R(theta) M; the transformed
   profile f'(x) = f(A^-1 x) has F'(k) = |det A| F(A^T k) (flux scales by mu, as GalSim's
   ``lens``). F is resampled at A^T k by cubic B-spline interpolation (prefiltered at
   preparation; four bilinear ``grid_sample`` fetches per point) on the half-plane k-grid of a fine real-space grid (spacing p/2, period ``period`` pixels), then
   multiplied by the PSF transform, the pixel transfer function sinc(k_x p/2pi) sinc(k_y p/2pi)
   and the shift phase exp(i k . x0); frequencies beyond the fine grid's Nyquist are negligible
   after PSF x pixel (< ``k_eps``) and dropped. Sub-sampling the fine grid at the pixel centres
   is a fold of the spectrum onto the pixel grid's frequencies, followed by one small inverse
   real FFT; the output is the top-left ``size x size`` crop.

Accuracy and speed are measured by ``benchmarks/render_torch.py`` and asserted by
``tests/test_torch_render.py`` (max |residual| < 1% of the stamp peak, adaptive-moment
ellipticity difference < 1e-3 against GalSim).

Limitations: the PSF must be the same for every stamp (it is per renderer); galaxy light
beyond ``max_extent / 2`` arcsec of the centre (in the source frame) or beyond the output period
wraps around, like GalSim's own folding; GalSim also truncates k at the PSF's ``maxk`` while this
renderer keeps frequencies to ``k_eps``, so tiny (<< 1e-3 of the peak) differences remain.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

#: Default settings (attributes of the module-level ``SETTINGS``; change them before drawing).


@dataclass
class TorchRenderSettings:
    """Numerical settings of the torch renderer.

    oversample : k-grid oversampling of a galaxy's real-space extent (cubic B-spline
        interpolation; 2 keeps its error well below 1e-3 of the peak).
    max_extent : cap [arcsec] on the real-space extent L of a galaxy's prepared grid (galaxies
        with huge Sersic wings would otherwise need enormous grids; the stamp only sees the
        central few arcsec).
    min_extent : floor [arcsec] on L.
    periods : candidate real-space periods of the output grid [pixels]; each galaxy uses the
        smallest one whose wrapped-around light is below ``wrap_tol`` x its peak (cost grows as
        period^2).
    wrap_tol : see ``periods``.
    k_eps : frequencies where |PSF x pixel| < k_eps are dropped.
    cache_size : prepared galaxies kept per source (LRU).
    device, dtype : torch device and real dtype of the per-batch computation.
    """

    oversample: float = 2.0
    max_extent: float = 12.0
    min_extent: float = 2.0
    periods: tuple = (64, 96, 128, 192)
    wrap_tol: float = 1e-4
    k_eps: float = 1e-4
    cache_size: int = 2000
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
    )
    _GRIDS[key] = g
    return g


# ---------------------------------------------------------------------------------------------
# Prepared galaxies


@dataclass
class PreparedGalaxy:
    """Half-plane cubic B-spline coefficients of the Fourier transform of one unlensed galaxy.

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
                   pixel_scale: float = 0.065, size: int = 32, shift: float = 3.5) -> PreparedGalaxy:
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


class _Cache:
    """Per-source LRU of prepared galaxies (module level; never pickled into worker processes)."""

    def __init__(self):
        self._by_source = weakref.WeakKeyDictionary()

    def get(self, source, key, factory, maxsize):
        d = self._by_source.get(source)
        if d is None:
            d = OrderedDict()
            self._by_source[source] = d
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


def _psf_sigma(psf) -> float:
    import galsim

    if isinstance(psf, galsim.Gaussian):
        return float(psf.sigma)
    return float(psf.calculateFWHM()) / 2.3548200450309493


def _q_need(renderer, settings, device, dtype) -> float:
    k_max = max(_output_grid(renderer, settings, device, dtype, per).k_max for per in settings.periods)
    return k_max * _max_stretch(renderer.augment) * 1.001


def prepared(renderer, gid: int, settings: TorchRenderSettings = SETTINGS, device="cpu", dtype=torch.float32):
    """The cached ``PreparedGalaxy`` of galaxy ``gid`` of ``renderer.source``."""
    q_need = _q_need(renderer, settings, device, dtype)
    aug = renderer.augment
    key = (int(gid), round(q_need, 6), settings.oversample, settings.max_extent, settings.min_extent,
           tuple(settings.periods), settings.wrap_tol, renderer.stamp_size, aug.shift, str(device), dtype)
    return CACHE.get(
        renderer.source, key,
        lambda: prepare_galaxy(renderer.source.galaxy(int(gid)), q_need, settings, device, dtype,
                               _psf_sigma(renderer.psf), _max_stretch(aug), renderer.pixel_scale,
                               renderer.stamp_size, aug.shift),
        settings.cache_size,
    )


# ---------------------------------------------------------------------------------------------
# Drawing


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


def draw_batch(renderer, params, size: int, settings: TorchRenderSettings | None = None):
    """Draw noiseless stamps like the GalSim backend (before mask / flux factor / noise).

    Returns (images (N, size, size) float64 numpy, failures list of (row, message)); a failed
    row holds NaN.
    """
    settings = settings or SETTINGS
    device = torch.device(settings.device)
    dtype = settings.dtype
    n = len(params)
    out = np.full((n, size, size), np.nan)
    failures = []
    if n == 0:
        return out, failures
    if size > min(settings.periods):
        raise ValueError(f"stamp size {size} exceeds the smallest torch renderer period {min(settings.periods)}; "
                         "raise SETTINGS.periods")

    a = transform_matrices(params)  # (N, 2, 2)
    gid = np.asarray(params.galaxy_id, np.int64)
    preps = {}
    for g in np.unique(gid):
        try:
            preps[int(g)] = prepared(renderer, int(g), settings, device, dtype)
        except Exception as err:  # a galaxy GalSim cannot prepare becomes a recorded failure
            for i in np.flatnonzero(gid == g):
                failures.append((int(i), f"{type(err).__name__}: {err}"))
    period = np.array([preps[int(g)].period if int(g) in preps else 0 for g in gid])
    for per in np.unique(period[period > 0]):
        rows = np.flatnonzero(period == per)
        out[rows] = _draw_group(renderer, params, rows, a[rows], gid[rows], preps, int(per), size,
                                settings, device, dtype)
    failed = {i for i, _ in failures}
    for i in np.flatnonzero(~np.all(np.isfinite(out), axis=(1, 2))):
        if int(i) not in failed:
            failures.append((int(i), "non-finite pixels in the torch renderer"))
    return out, failures


def _draw_group(renderer, params, rows, a, gid, preps, period, size, settings, device, dtype):
    """Stamps ``rows`` (all with output period ``period``) as an (n, size, size) float64 array."""
    grid = _output_grid(renderer, settings, device, dtype, period)
    n_out = grid.n_out
    n = len(rows)
    p = renderer.pixel_scale
    at = torch.as_tensor(a, dtype=torch.float64, device=device)
    det = torch.as_tensor(np.abs(np.linalg.det(a)), dtype=dtype, device=device)
    ctype = torch.complex64 if dtype == torch.float32 else torch.complex128
    spec = torch.zeros((n, 2 * n_out * (n_out + 1)), dtype=ctype, device=device)
    for g in np.unique(gid):
        loc = torch.as_tensor(np.flatnonzero(gid == g), device=device)
        q = torch.einsum("pi,nij->npj", grid.k, at[loc]).to(dtype)  # q = A^T k
        re, im = _sample(preps[int(g)], q)
        spec[loc[:, None], grid.sel[None, :]] = torch.complex(re, im) * (grid.transfer * det[loc, None])
    spec = spec.reshape(n, 2 * n_out, n_out + 1)

    # shift phase exp(i k . x0), x0 = centre of output pixel (0, 0) relative to the profile centre
    c = (size - 1) / 2.0
    x0 = torch.as_tensor((-c - np.asarray(params.dx, float)[rows]) * p, dtype=dtype, device=device)
    y0 = torch.as_tensor((-c - np.asarray(params.dy, float)[rows]) * p, dtype=dtype, device=device)
    px = torch.polar(torch.ones((n, n_out + 1), dtype=dtype, device=device), x0[:, None] * grid.kx[None, :])
    py = torch.polar(torch.ones((n, 2 * n_out), dtype=dtype, device=device), y0[:, None] * grid.ky[None, :])
    spec *= py[:, :, None] * px[:, None, :]

    # fold the fine spectrum (real-space spacing p/2) onto the pixel grid's frequencies (= keep
    # every other fine sample): rows n and n - n_out coincide; column q_x also receives the
    # conjugate of column n_out - q_x at the negated row (Hermitian half plane).
    h = spec[:, :n_out, :] + spec[:, n_out:, :]  # (n, n_out, n_out + 1)
    nh = n_out // 2
    rev = (-torch.arange(n_out, device=device)) % n_out
    mirror_cols = n_out - torch.arange(nh + 1, device=device)
    folded = h[:, :, : nh + 1] + torch.conj(h[:, rev][:, :, mirror_cols])
    img = torch.fft.irfft2(folded, s=(n_out, n_out))[:, :size, :size]
    return img.to(torch.float64).cpu().numpy()
