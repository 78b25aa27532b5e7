"""Metacalibration: counterfactual images of observed stamps under a small extra shear.

Huff & Mandelbaum (2017), Sheldon & Huff (2017); ``../shared/method.md``, last section. For an
observed stamp ``I`` with known effective PSF ``P`` (here: the CLASH Gaussian, FWHM 0.121", convolved
with the 0.065" pixel) the counterfactual image under an extra shear ``d`` is::

    I_d = P' * S_d[ P^-1 * I ]

with ``S_d`` the GalSim shear (area preserving, about the stamp centre at 0-indexed pixel
(15.5, 15.5)) and ``P'`` the *reconvolution* PSF. Our choice of ``P'``: an isotropic Gaussian of
FWHM ``reconv_factor`` x the PSF FWHM, convolved with the pixel (the output is a pixel-integrated
image like the input, so a network sees stamps that look like CLASH stamps with a slightly wider
PSF). It must be wider than ``P``: the CLASH PSF (FWHM 1.86 px) is slightly undersampled, so the
deconvolution amplifies k-modes near and beyond Nyquist that only ``P'`` suppresses. The default
factor 1.6 leaves ``P'/P`` = 0.008 at the Nyquist frequency (1.3 left 0.12, and with it a
multiplicative bias m1 ~ -0.004 along the pixel axes that m2 does not have; docs/METACAL.md).

Implementation. The whole operation is linear in the pixel values, so for each shear ``d`` it is
one fixed ``(n^2, n^2)`` matrix ``M_d`` (n = stamp side): ``I_d = M_d I``. With the input
interpolated by GalSim's quintic kernel ``u`` (as ``galsim.InterpolatedImage``), in Fourier space::

    W_d(k) = P'(k) pix(k) u(A k) / (P(A k) pix(A k)),     M_d[i, j] = w_d(x_i - A x_j)

with ``A`` the (symmetric, det 1) shear matrix, ``x`` pixel-centre positions about the stamp centre
and ``w_d`` the inverse Fourier transform of ``W_d``, computed once on a fine grid (1/``oversample``
px) and interpolated with cubic splines. As GalSim does when drawing, ``W_d`` is cut to the square
``|k_x|, |k_y| <= k_max`` where the reconvolution Gaussian falls to ``maxk_threshold``. Matrices are
built in float64 (~0.3 s each) and cached per process; applying them is a batched matmul in torch,
on any device.

Correlated noise ("fixnoise", Sheldon & Huff 2017): shearing the image also shears its noise, whose
correlations then carry the applied shear ``d`` into the response. A second, independent
realisation ``n'`` of the stamp's own noise (same kernel and level) is rotated by 90 degrees, put
through the same operator, rotated back and added: ``I_d + rot^-1(M_d rot(n'))``. A quarter turn
flips the sign of a shear, so the sheared correlations of the two noise fields cancel to first
order in ``d``; the noise variance doubles. The same ``n'`` serves all shears of one stamp.

Stamp edges. A stamp is a cut-out: the counterfactual of a pixel near its edge needs the light
just outside it, which a 32 x 32 stamp does not hold, and the shear moves light across the square
edge differently for g1 (along the edges) and g2 (diagonal). Metacal of the 32 x 32 stamps of large
galaxies is then biased (the CNN on the embedded parametric population at full noise: m1 = -0.017
for the bright tertile, -0.048 for hlr > 9 px, while m2 stays near -0.005). The operator therefore
takes stamps with a ``margin`` of extra pixels on each side (``stamp_size + 2 margin``, default
margin 8: 48 x 48) and returns the central ``stamp_size`` of each counterfactual; every output
pixel then sees all the input its kernel reaches. The operator accepts any even margin up to
the input given (``margin_of``), so stamps without margin still work (with the edge bias).

Units: pixel values in counts (flux conserved: every ``M_d`` maps a stamp's sum to itself up to
what falls off the stamp); FWHMs in arcsec; ``step`` is the dimensionless shear ``d``.
Shear names: ``noshear`` (0, 0), ``1p`` (+d, 0), ``1m`` (-d, 0), ``2p`` (0, +d), ``2m`` (0, -d).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wlshear.sim.constants import PIXEL_SCALE, PSF_FWHM, STAMP_SIZE
from wlshear.sim.noise import load_kernel
from wlshear.utils.precision import full_precision

__all__ = [
    "SHEAR_NAMES",
    "MetacalSettings",
    "MetacalOperator",
    "shear_matrix",
    "counterfactual_matrix",
    "central",
]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

#: Name -> (sign of d on g1, sign of d on g2).
SHEAR_NAMES: dict[str, tuple[int, int]] = {
    "noshear": (0, 0),
    "1p": (1, 0),
    "1m": (-1, 0),
    "2p": (0, 1),
    "2m": (0, -1),
}


def shear_matrix(g1: float, g2: float) -> np.ndarray:
    """GalSim's area-preserving shear matrix ``A`` (x' = A x), x = column, y = row.

    ``A = [[1 + g1, g2], [g2, 1 - g1]] / sqrt(1 - g1^2 - g2^2)``; g1 > 0 stretches along x.
    """
    g2sq = g1 * g1 + g2 * g2
    if not g2sq < 1:
        raise ValueError(f"|g| must be < 1, got g = ({g1}, {g2})")
    return np.array([[1 + g1, g2], [g2, 1 - g1]], dtype=np.float64) / math.sqrt(1 - g2sq)


@dataclass(frozen=True)
class MetacalSettings:
    """Everything that defines the counterfactual images (stored in estimator files).

    psf_fwhm : FWHM of the observed Gaussian PSF [arcsec] (the pixel is added to it).
    pixel_scale : [arcsec / pixel].
    stamp_size : stamp side [pixels].
    reconv_factor : FWHM of the reconvolution Gaussian / ``psf_fwhm`` (> 1).
    step : metacal shear ``d`` (dimensionless) for the response.
    fixnoise : add the rotated, counter-sheared second noise realisation.
    noise_scale : multiplies ``noise_kernel`` (the stamps' own noise level; 0 = no fixnoise noise).
    noise_kernel : 2-D kernel [counts] as nested lists, a kernel file (.npy/.txt), or None for the
        embedded CLASH kernel.
    maxk_threshold : the Fourier cut-off where the reconvolution Gaussian falls to this value.
    oversample : fine-grid sampling of the kernel ``w_d`` [samples per pixel].
    interpolant : ``"sinc"`` (band-limited, default) or ``"quintic"`` (GalSim's kernel).
    fixnoise_scheme : ``"isotropic"`` (second field drawn with the kernel turned by 90 degrees) or
        ``"ngmix"`` (the stamps' own kernel).
    margin : extra pixels on each side of the stamps given to the operator [pixels]; the
        counterfactuals are the central ``stamp_size``. Training renders, and ``infer_clash``
        extracts, stamps of ``stamp_size + 2 margin``.
    """

    psf_fwhm: float = PSF_FWHM
    pixel_scale: float = PIXEL_SCALE
    stamp_size: int = STAMP_SIZE
    reconv_factor: float = 1.6
    step: float = 0.01
    fixnoise: bool = True
    noise_scale: float = 1.0
    noise_kernel: Any = field(default=None, compare=True)
    maxk_threshold: float = 1e-3
    oversample: int = 4
    interpolant: str = "sinc"
    fixnoise_scheme: str = "isotropic"
    margin: int = 8

    def __post_init__(self) -> None:
        checks = {
            "psf_fwhm": self.psf_fwhm > 0,
            "pixel_scale": self.pixel_scale > 0,
            "stamp_size": int(self.stamp_size) >= 4,
            "reconv_factor": self.reconv_factor > 1.0,
            "step": 0 < self.step < 0.2,
            "noise_scale": self.noise_scale >= 0,
            "maxk_threshold": 0 < self.maxk_threshold < 1,
            "oversample": int(self.oversample) >= 2,
            "interpolant": self.interpolant in ("sinc", "quintic"),
            "fixnoise_scheme": self.fixnoise_scheme in ("isotropic", "ngmix"),
            "margin": int(self.margin) == self.margin and 0 <= self.margin <= 64,
        }
        allowed = {"psf_fwhm": "> 0 arcsec", "pixel_scale": "> 0 arcsec/px", "stamp_size": ">= 4 px",
                   "reconv_factor": "> 1 (the reconvolution PSF must be wider than the PSF)",
                   "step": "in (0, 0.2)", "noise_scale": ">= 0", "maxk_threshold": "in (0, 1)",
                   "oversample": ">= 2", "interpolant": "'sinc' or 'quintic'",
                   "fixnoise_scheme": "'isotropic' or 'ngmix'", "margin": "an integer in [0, 64] px"}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"metacal.{key} = {getattr(self, key)!r} is out of range: must be {allowed[key]}")
        if self.noise_kernel is not None and not isinstance(self.noise_kernel, tuple):
            nk = self.noise_kernel
            k = load_kernel(nk) if isinstance(nk, str) else np.asarray(nk, dtype=float)
            object.__setattr__(self, "noise_kernel", tuple(tuple(float(v) for v in row) for row in k))

    @property
    def input_size(self) -> int:
        """Side of the stamps the pipeline gives the operator: ``stamp_size + 2 margin`` [pixels]."""
        return int(self.stamp_size) + 2 * int(self.margin)

    @property
    def sigma_px(self) -> float:
        """Gaussian sigma of the observed PSF [pixels]."""
        return self.psf_fwhm / self.pixel_scale * FWHM_TO_SIGMA

    @property
    def reconv_sigma_px(self) -> float:
        """Gaussian sigma of the reconvolution PSF [pixels]."""
        return self.sigma_px * self.reconv_factor

    @property
    def kmax(self) -> float:
        """Fourier cut-off [rad / pixel]."""
        return math.sqrt(-2.0 * math.log(self.maxk_threshold)) / self.reconv_sigma_px

    def kernel_array(self) -> np.ndarray:
        """The noise kernel x noise_scale [counts]."""
        k = load_kernel(None) if self.noise_kernel is None else np.asarray(self.noise_kernel, dtype=float)
        return k * self.noise_scale

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["noise_kernel"] = None if self.noise_kernel is None else [list(r) for r in self.noise_kernel]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MetacalSettings":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown metacal settings {unknown}; known: {sorted(known)}")
        return cls(**dict(d))


def _quintic_ft(k: np.ndarray) -> np.ndarray:
    """Fourier transform of GalSim's quintic interpolant (k in rad / pixel)."""
    import galsim

    return np.asarray(galsim.Quintic().kval(np.abs(k).ravel()), dtype=np.float64).reshape(k.shape)


def _sinc_half(k: np.ndarray) -> np.ndarray:
    """Pixel response sin(k/2) / (k/2) (unit pixel)."""
    return np.sinc(k / (2 * np.pi))


def _transfer(kx: np.ndarray, ky: np.ndarray, g1: float, g2: float, s: MetacalSettings) -> np.ndarray:
    """``W_d(k)`` on a grid of (kx, ky) [rad / pixel] (see the module docstring)."""
    a = shear_matrix(g1, g2)
    kxs = a[0, 0] * kx + a[0, 1] * ky  # A^T k with A symmetric
    kys = a[1, 0] * kx + a[1, 1] * ky
    sig, sig_r = s.sigma_px, s.reconv_sigma_px
    reconv = np.exp(-0.5 * sig_r**2 * (kx**2 + ky**2)) * _sinc_half(kx) * _sinc_half(ky)
    psf = np.exp(-0.5 * sig**2 * (kxs**2 + kys**2)) * _sinc_half(kxs) * _sinc_half(kys)
    if s.interpolant == "quintic":
        interp = _quintic_ft(kxs) * _quintic_ft(kys)
        cut = (np.abs(kx) <= s.kmax) & (np.abs(ky) <= s.kmax)
    else:  # band-limited: the exact transform of the samples inside an isotropic disc below Nyquist
        interp = 1.0
        cut = np.hypot(kx, ky) <= min(s.kmax, np.pi / (1.0 + 2.0 * s.step))
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(cut, reconv * interp / psf, 0.0)
    return np.where(np.isfinite(w), w, 0.0)


def _geometry(s: MetacalSettings) -> MetacalSettings:
    """The settings that define the matrices (noise settings do not): the cache key."""
    return MetacalSettings(psf_fwhm=s.psf_fwhm, pixel_scale=s.pixel_scale, stamp_size=s.stamp_size,
                           reconv_factor=s.reconv_factor, step=s.step, maxk_threshold=s.maxk_threshold,
                           oversample=s.oversample, interpolant=s.interpolant)


def _centres(n: int) -> np.ndarray:
    """(2, n^2) (x, y) of the pixel centres of an n x n grid about its centre, row-major (y, x)."""
    c = np.arange(n) - (n - 1) / 2.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()])


@lru_cache(maxsize=32)
def _matrix_cached(g1: float, g2: float, s: MetacalSettings, margin: int = 0) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    n = int(s.stamp_size)
    n_in = n + 2 * int(margin)
    h = 1.0 / int(s.oversample)
    period = 4 * n_in  # real-space period of the discrete kernel [px]: > stamp diagonal + kernel width
    ngrid = int(round(period / h))
    k1 = 2 * np.pi * np.fft.fftfreq(ngrid, d=h)
    kx, ky = np.meshgrid(k1, k1, indexing="xy")  # axis 0 = y, axis 1 = x
    wk = _transfer(kx, ky, g1, g2, s)
    w = np.fft.fftshift(np.real(np.fft.ifft2(wk))) / h**2  # w(r) on r = (index - ngrid/2) * h
    out_pos, in_pos = _centres(n), _centres(n_in)  # both about the common stamp centre
    src = shear_matrix(g1, g2) @ in_pos  # A x_j
    rx = out_pos[0][:, None] - src[0][None, :]  # (out i, in j)
    ry = out_pos[1][:, None] - src[1][None, :]
    coords = np.stack([ry.ravel() / h + ngrid / 2, rx.ravel() / h + ngrid / 2])
    m = map_coordinates(w, coords, order=3, mode="constant", cval=0.0, prefilter=True)
    return m.reshape(n * n, n_in * n_in)


def counterfactual_matrix(g1: float, g2: float, settings: MetacalSettings | None = None,
                          margin: int | None = None) -> np.ndarray:
    """``M_d`` (float64, ``(n^2, (n + 2 margin)^2)``, row = output pixel of the central n x n,
    column = input pixel, both row-major (y, x)); ``margin`` defaults to the settings' own."""
    s = settings or MetacalSettings()
    m = int(s.margin if margin is None else margin)
    return _matrix_cached(float(g1), float(g2), _geometry(s), m).copy()


def central(stamps: np.ndarray, size: int = STAMP_SIZE) -> np.ndarray:
    """The central ``size`` x ``size`` pixels of stamps ``(..., S, S)`` (S - size even): the stamps
    that estimators without a margin take, from stamps rendered or cut with one."""
    s = stamps.shape[-1]
    if s < size or (s - size) % 2 or stamps.shape[-2] != s:
        raise ValueError(f"cannot take the central {size} x {size} of stamps shaped {tuple(stamps.shape)}")
    o = (s - size) // 2
    return stamps[..., o:o + size, o:o + size]


def _rotated(m: np.ndarray, n: int, n_in: int | None = None) -> np.ndarray:
    """The matrix of ``rot^-1 (M rot(x))`` for ``rot`` = one quarter-turn (numpy rot90, axes (y, x));
    ``M`` maps ``n_in x n_in`` inputs (default ``n``) to ``n x n`` outputs about the same centre."""
    n_in = n if n_in is None else n_in
    m4 = m.reshape(n, n, n_in, n_in)
    # sum_p M[o, p] rot(x)[p] = sum_q (rot^-1 applied to M's input axes)[o, q] x[q]
    m4 = np.rot90(m4, -1, axes=(2, 3))
    m4 = np.rot90(m4, -1, axes=(0, 1))
    return np.ascontiguousarray(m4).reshape(n * n, n_in * n_in)


class MetacalOperator:
    """Batched counterfactual images (torch), for training, evaluation and cluster fields alike.

    ``MetacalOperator(**settings)`` takes the fields of :class:`MetacalSettings`.

    - :meth:`counterfactuals` gives ``(N, K, n, n)`` images for the requested shears (default all
      five), with the fixnoise field added when ``fixnoise`` and ``noise_scale > 0``.
    - :meth:`noshear` gives the ``d = 0`` counterfactual only (what a network trained for metacal
      sees; usable as a model's ``input_transform``).
    """

    def __init__(self, settings: MetacalSettings | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if settings is None:
            settings = MetacalSettings(**kwargs)
        elif isinstance(settings, Mapping):
            settings = MetacalSettings.from_dict({**dict(settings), **kwargs})
        elif kwargs:
            raise ValueError("pass either a MetacalSettings or keyword settings, not both")
        self.settings = settings
        self._mats: dict[tuple, torch.Tensor] = {}
        self._noise_kernel: torch.Tensor | None = None

    # -- matrices -------------------------------------------------------------------------------
    def shears(self, names: Sequence[str]) -> list[tuple[float, float]]:
        d = self.settings.step
        bad = [nm for nm in names if nm not in SHEAR_NAMES]
        if bad:
            raise ValueError(f"unknown metacal shear names {bad}; known: {list(SHEAR_NAMES)}")
        return [(SHEAR_NAMES[nm][0] * d, SHEAR_NAMES[nm][1] * d) for nm in names]

    def margin_of(self, size: int) -> int:
        """The margin [px] of input stamps of side ``size`` (``size = stamp_size + 2 margin``)."""
        n = int(self.settings.stamp_size)
        if size < n or (size - n) % 2:
            raise ValueError(f"metacal needs square stamps of side {n} + 2 x margin (margin >= 0; this "
                             f"estimator's pipeline uses {self.settings.input_size}), got side {size}")
        return (size - n) // 2

    def _stacked(self, names: tuple[str, ...], noise: bool, margin: int, device, dtype) -> torch.Tensor:
        key = (names, noise, margin, str(device), dtype)
        if key not in self._mats:
            n = int(self.settings.stamp_size)
            mats = []
            for g1, g2 in self.shears(names):
                m = counterfactual_matrix(g1, g2, self.settings, margin=margin)
                mats.append(_rotated(m, n, n + 2 * margin) if noise else m)
            stacked = np.concatenate([m.T for m in mats], axis=1)  # (n_in^2 in, K n^2 out)
            self._mats[key] = torch.as_tensor(stacked, dtype=dtype, device=device)
        return self._mats[key]

    # -- noise ----------------------------------------------------------------------------------
    @property
    def adds_noise(self) -> bool:
        return bool(self.settings.fixnoise) and self.settings.noise_scale > 0

    def sample_noise(self, n: int, device=None, dtype=torch.float32, generator: torch.Generator | None = None,
                     size: int | None = None) -> torch.Tensor:
        """``n`` fixnoise fields ``(n, size, size)`` [counts] (default size: ``settings.input_size``):
        the stamps' own noise kernel and level, rotated by 90 degrees for ``fixnoise_scheme='isotropic'``."""
        s = int(self.settings.input_size if size is None else size)
        if self._noise_kernel is None:
            k = self.settings.kernel_array()
            if self.settings.fixnoise_scheme == "isotropic":
                k = np.rot90(k).copy()  # covariance rotated by 90 degrees (see the module docstring)
            self._noise_kernel = torch.as_tensor(k, dtype=torch.float64)
        k = self._noise_kernel.to(device=device, dtype=dtype)
        ky, kx = k.shape
        gen_device = generator.device if generator is not None else device
        white = torch.randn((n, 1, s + ky - 1, s + kx - 1), generator=generator, dtype=dtype, device=gen_device)
        return F.conv2d(white.to(device), k[None, None])[:, 0]

    def group_noise(self, noise_groups, n: int, generator: torch.Generator | None = None,
                    size: int | None = None, chunk: int = 2048) -> tuple[torch.Tensor, np.ndarray]:
        """One fixnoise field per distinct group of ``noise_groups`` (``(n,)`` non-negative ints):
        ``(fields (G, size, size) float32 [counts], index (n,))``, stamp i's field ``fields[index[i]]``.

        Group ids need not be contiguous (only the distinct ones get a field), and the fields are
        drawn ``chunk`` at a time: convolving a few hundred thousand fields in one call needs tens
        of GB, the fields themselves 9 kB each at 48 x 48.
        """
        grp = np.asarray(noise_groups)
        if grp.shape != (n,) or not np.issubdtype(grp.dtype, np.integer) or (n and grp.min() < 0):
            raise ValueError(f"noise_groups must be ({n},) non-negative integers, got shape {grp.shape}, "
                             f"dtype {grp.dtype}")
        ids, index = np.unique(grp, return_inverse=True)
        s = int(self.settings.input_size if size is None else size)
        fields = torch.empty((len(ids), s, s), dtype=torch.float32)
        for a in range(0, len(ids), chunk):
            b = min(a + chunk, len(ids))
            fields[a:b] = self.sample_noise(b - a, "cpu", torch.float32, generator, size=s)
        return fields, index.reshape(-1)

    # -- application ----------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3 or x.shape[1] != x.shape[2]:
            n = self.settings.input_size
            raise ValueError(f"metacal needs square stamps (N, {n}, {n}) (or (N, 1, {n}, {n})), got {tuple(x.shape)}")
        self.margin_of(int(x.shape[-1]))
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)).sum())
            raise ValueError(f"metacal input has non-finite pixels in {bad} of {len(x)} stamps; "
                             "flag or drop them first (e.g. with np.isfinite(stamps).all(axis=(1, 2)))")
        return x

    def counterfactuals(
        self,
        stamps: torch.Tensor | np.ndarray,
        names: Sequence[str] = tuple(SHEAR_NAMES),
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Counterfactual images ``(N, K, n, n)`` (n = ``stamp_size``: the central part) for the
        shears ``names``, from stamps ``(N, n + 2 margin, n + 2 margin)`` (same dtype/device).

        ``noise``: the fixnoise fields, shaped like the input stamps (default: drawn with ``generator``).
        """
        x = self._check(torch.as_tensor(stamps))
        if not x.is_floating_point():
            x = x.float()
        names = tuple(names)
        n = int(self.settings.stamp_size)
        size = int(x.shape[-1])
        margin = self.margin_of(size)
        flat = x.reshape(len(x), size * size)
        if self.adds_noise:
            if noise is None:
                noise = self.sample_noise(len(x), x.device, x.dtype, generator, size=size)
            if tuple(noise.shape[-2:]) != (size, size):
                raise ValueError(f"fixnoise fields must match the stamps ({size} x {size}), got {tuple(noise.shape)}")
        with full_precision():  # responses are differences at the 1% level: no bf16 / TF32 products
            out = flat @ self._stacked(names, False, margin, x.device, x.dtype)
            if self.adds_noise:
                out = out + noise.reshape(len(x), size * size).to(x) @ self._stacked(names, True, margin, x.device, x.dtype)
        return out.reshape(len(x), len(names), n, n)

    def noshear(self, stamps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The ``d = 0`` counterfactual with fixnoise: ``(N, n, n)`` (or ``(N, 1, n, n)``, as the input)
        for inputs with any margin."""
        x = torch.as_tensor(stamps)
        out = self.counterfactuals(x, ("noshear",), generator=generator)[:, 0]
        n = int(self.settings.stamp_size)
        return out.reshape(*x.shape[:-2], n, n)

    __call__ = noshear

    def noshear_batches(self, loader, seed: int) -> "_NoShearBatches":
        """``(x, y, ...)`` batches of ``loader`` with ``x`` mapped to its no-shear counterfactual (fixnoise
        fields from one generator seeded with ``seed``): the head refit of a metacal network."""
        return _NoShearBatches(self, loader, seed)

    def to_dict(self) -> dict[str, Any]:
        return self.settings.to_dict()

    def __repr__(self) -> str:
        s = self.settings
        return (f"MetacalOperator(reconv_factor={s.reconv_factor}, step={s.step}, fixnoise={s.fixnoise}, "
                f"noise_scale={s.noise_scale}, psf_fwhm={s.psf_fwhm})")


class _NoShearBatches:
    """See :meth:`MetacalOperator.noshear_batches`."""

    def __init__(self, op: MetacalOperator, loader, seed: int) -> None:
        self.op, self.loader = op, loader
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        op = self.op
        for batch in self.loader:
            x = torch.as_tensor(batch[0]).float()
            noise = op.sample_noise(len(x), "cpu", torch.float32, self.gen, size=x.shape[-1]) if op.adds_noise else None
            yield (op.counterfactuals(x, ("noshear",), noise=noise)[:, 0], *batch[1:])
