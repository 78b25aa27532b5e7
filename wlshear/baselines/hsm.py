"""GalSim HSM shear estimators (KSB and REGAUSS) with the common estimator interface.

Both run ``galsim.hsm.EstimateShear`` stamp by stamp with a Gaussian PSF image (default FWHM
0.121" at 0.065"/px) drawn on a stamp of the same size, centred like the galaxies at the stamp
centre. ``galsim.Image(array)`` uses ``array[y, x]``, the same (row = y, column = x) order as our
stamps (``docs/CONVENTIONS.md``), so HSM's e1/g1 > 0 means elongated along x, as ours.

- KSB returns a per-galaxy *shear* estimate (``corrected_g1/g2``).
- REGAUSS returns a *distortion* e = (a^2 - b^2)/(a^2 + b^2) (``corrected_e1/e2``); it is turned
  into a shear-like ellipticity g = e / (1 + sqrt(1 - |e|^2)). Rows with |e| >= 1 are failures.

Neither is calibrated here; use the linear bias fit. Failures (HSM error message, exception,
non-finite result, flat/NaN stamp) give NaN rows and ``failed = True``.
"""

from __future__ import annotations

import numpy as np

from wlshear.observables import as_stamp_batch
from wlshear.sim.constants import PIXEL_SCALE, PSF_FWHM

__all__ = ["gaussian_psf_image", "HSMEstimator", "KSBEstimator", "REGAUSSEstimator"]



def gaussian_psf_image(fwhm: float = PSF_FWHM, pixel_scale: float = PIXEL_SCALE, size: int = 32):
    """Gaussian PSF (FWHM in arcsec) drawn with pixel convolution on a ``size`` px stamp.

    Returns a ``galsim.Image`` with unit flux centred on the stamp's true centre (for even sizes,
    between the four central pixels, like the galaxies).
    """
    import galsim

    psf = galsim.Gaussian(fwhm=fwhm)
    return psf.drawImage(nx=size, ny=size, scale=pixel_scale)


class HSMEstimator:
    """Base class: one of GalSim's HSM PSF-corrected shape estimators.

    Parameters
    ----------
    shear_est : ``'KSB'`` or ``'REGAUSS'`` (others GalSim accepts also work; outputs of type
        ``'e'`` are converted to shear-like g).
    psf_fwhm : Gaussian PSF FWHM in arcsec (default 0.121).
    pixel_scale : arcsec / px (default 0.065).
    guess_sig_psf, guess_sig_gal : initial Gaussian sigmas in pixels for HSM's adaptive moments.
    strict : passed to GalSim; with False failures are reported in ``error_message``.
    max_abs_g : estimates with |g| >= this are unphysical (KSB's response division blows up on
        noisy, barely resolved galaxies) and are flagged as failures, counted like any other;
        None keeps them.
    """

    name = "hsm"

    def __init__(
        self,
        shear_est: str = "KSB",
        psf_fwhm: float = PSF_FWHM,
        pixel_scale: float = PIXEL_SCALE,
        guess_sig_psf: float = 0.8,
        guess_sig_gal: float = 2.0,
        strict: bool = False,
        max_abs_g: float | None = 1.0,
    ):
        self.shear_est = shear_est
        self.max_abs_g = None if max_abs_g is None else float(max_abs_g)
        self.psf_fwhm = float(psf_fwhm)
        self.pixel_scale = float(pixel_scale)
        self.guess_sig_psf = float(guess_sig_psf)
        self.guess_sig_gal = float(guess_sig_gal)
        self.strict = bool(strict)
        self._psf_cache: dict[tuple[int, int], object] = {}

    def _psf(self, ny: int, nx: int):
        import galsim

        key = (ny, nx)
        if key not in self._psf_cache:
            psf = galsim.Gaussian(fwhm=self.psf_fwhm)
            self._psf_cache[key] = psf.drawImage(nx=nx, ny=ny, scale=self.pixel_scale)
        return self._psf_cache[key]

    def _one(self, stamp: np.ndarray):
        """Return (g1, g2) for one stamp or None on failure."""
        import galsim

        if not np.all(np.isfinite(stamp)) or not np.any(stamp != 0):
            return None
        img = galsim.Image(np.ascontiguousarray(stamp, dtype=np.float64), scale=self.pixel_scale)
        try:
            res = galsim.hsm.EstimateShear(
                img,
                self._psf(*stamp.shape),
                shear_est=self.shear_est,
                guess_sig_PSF=self.guess_sig_psf,
                guess_sig_gal=self.guess_sig_gal,
                strict=self.strict,
            )
        except (galsim.GalSimError, RuntimeError, ValueError):
            return None
        if res.error_message:
            return None
        if res.meas_type == "g":
            g = np.array([res.corrected_g1, res.corrected_g2], dtype=np.float64)
        else:  # distortion e -> shear-like g
            e = np.array([res.corrected_e1, res.corrected_e2], dtype=np.float64)
            e2 = float(e @ e)
            if not np.isfinite(e2) or e2 >= 1.0:
                return None
            g = e / (1.0 + np.sqrt(1.0 - e2))
        if not np.all(np.isfinite(g)):
            return None
        if self.max_abs_g is not None and float(np.hypot(*g)) >= self.max_abs_g:
            return None
        return g

    def estimate(self, stamps):
        """Estimate (g1, g2) for ``(N, ny, nx)`` stamps (counts, axis order y, x).

        Returns ``g`` ``(N, 2)`` float64 (NaN rows on failure) and ``failed`` ``(N,)`` bool.
        """
        arr = as_stamp_batch(stamps)
        n = arr.shape[0]
        g = np.full((n, 2), np.nan)
        failed = np.ones(n, dtype=bool)
        for i in range(n):
            gi = self._one(arr[i])
            if gi is not None:
                g[i] = gi
                failed[i] = False
        return g, failed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shear_est={self.shear_est!r}, psf_fwhm={self.psf_fwhm})"


class KSBEstimator(HSMEstimator):
    """GalSim HSM KSB: per-galaxy shear estimate (``corrected_g1/g2``)."""

    name = "ksb"

    def __init__(self, **kw):
        kw.setdefault("shear_est", "KSB")
        super().__init__(**kw)


class REGAUSSEstimator(HSMEstimator):
    """GalSim HSM re-Gaussianization: distortion e converted to g = e / (1 + sqrt(1 - |e|^2))."""

    name = "regauss"

    def __init__(self, **kw):
        kw.setdefault("shear_est", "REGAUSS")
        super().__init__(**kw)
