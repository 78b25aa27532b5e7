"""FPFS shear estimator (AnaCal) at the known stamp centres, with the common interface.

Uses ``anacal.fpfs.process_image`` (tested with anacal 0.8.3) with a "detection" catalogue that
is simply the stamp centre (y, x) = (15.5, 15.5) in 0-indexed pixel coordinates (AnaCal's
positions use the same convention as our stamps: row = y, column = x). The PSF is a Gaussian of
FWHM 0.121" drawn on a 32 px stamp centred on pixel (16, 16), as AnaCal requires
(``FpfsTask`` docs: the PSF centre is pixel ``npix // 2``).

FPFS gives, per galaxy, an ellipticity (e1, e2) and its shear response (de1/dg1, de2/dg2). The
shear estimate is e / R where R is chosen by ``response``:

- ``'ensemble'`` (default): R = mean response over the non-failed galaxies in the call (the FPFS
  way: <e> / <R>). Per-galaxy values then depend on the batch, so pass a whole data set at once.
- ``'individual'``: each galaxy's own response (noisy; can be unstable at low S/N).
- ``'none'``: return e itself (response calibrated later by the linear bias fit).

The ellipticity weight parameter c0 is given as ``c0_sigma`` times the noise standard deviation
of the flux mode m00 (computed by AnaCal from ``noise_sigma``). No noise-bias correction with a
pure-noise image is done (``noise_array`` is not used).
"""

from __future__ import annotations

import numpy as np

from wlshear.observables import as_stamp_batch
from wlshear.sim.constants import PIXEL_SCALE, PSF_FWHM

__all__ = ["FPFSEstimator", "ANACAL_TESTED_VERSION"]

ANACAL_TESTED_VERSION = "0.8.3"
CLASH_NOISE_SIGMA = 3.60e-3  # counts per pixel (sqrt of the sum of squares of K_bg)


def _import_anacal():
    try:
        import anacal  # noqa: F401
        from anacal.fpfs import THRESHOLD_REF_MAG_ZERO, FpfsConfig, FpfsTask, process_image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The FPFS baseline needs AnaCal: `pip install anacal=="
            f"{ANACAL_TESTED_VERSION}` (tested version; other versions changed the API). "
            f"Import failed with: {exc}"
        ) from exc
    return FpfsConfig, FpfsTask, process_image, THRESHOLD_REF_MAG_ZERO


class FPFSEstimator:
    """AnaCal FPFS at the stamp centre.

    Parameters
    ----------
    sigma_shapelets : FPFS shapelet kernel sigma in arcsec (default 0.1" ~ 1.5 px).
    c0_sigma : ellipticity weight c0 in units of the m00 noise sigma.
    noise_sigma : per-pixel background noise sigma (counts) assumed for c0 and the errors;
        default the CLASH value 3.6e-3.
    response : ``'ensemble'``, ``'individual'`` or ``'none'`` (see module docstring).
    psf_fwhm, pixel_scale : Gaussian PSF FWHM (arcsec) and pixel scale (arcsec / px).
    """

    name = "fpfs"

    def __init__(
        self,
        sigma_shapelets: float = 0.1,
        c0_sigma: float = 4.0,
        noise_sigma: float = CLASH_NOISE_SIGMA,
        response: str = "ensemble",
        psf_fwhm: float = PSF_FWHM,
        pixel_scale: float = PIXEL_SCALE,
    ):
        if response not in ("ensemble", "individual", "none"):
            raise ValueError(
                f"response must be 'ensemble', 'individual' or 'none', got {response!r}"
            )
        self._api = _import_anacal()
        self.sigma_shapelets = float(sigma_shapelets)
        self.c0_sigma = float(c0_sigma)
        self.noise_sigma = float(noise_sigma)
        self.response = response
        self.psf_fwhm = float(psf_fwhm)
        self.pixel_scale = float(pixel_scale)
        self._setup: dict[int, tuple] = {}

    @property
    def whole_batch(self) -> bool:
        """The 'ensemble' response is measured on the whole batch: callers must not split it."""
        return self.response == "ensemble"

    def _prepare(self, npix: int):
        if npix in self._setup:
            return self._setup[npix]
        import galsim

        FpfsConfig, FpfsTask, _, _ = self._api
        # AnaCal wants the PSF centred on pixel npix // 2 (0-indexed): shift by half a pixel from
        # GalSim's default centre (between the central pixels for even npix).
        psf = galsim.Gaussian(fwhm=self.psf_fwhm)
        if npix % 2 == 0:
            psf = psf.shift(0.5 * self.pixel_scale, 0.5 * self.pixel_scale)
        psf_arr = psf.drawImage(nx=npix, ny=npix, scale=self.pixel_scale).array.astype(np.float64)
        task = FpfsTask(
            npix=npix, pixel_scale=self.pixel_scale, sigma_shapelets=self.sigma_shapelets,
            psf_array=psf_arr, kmax_thres=1e-12,
        )
        task.prepare_covariance(variance=self.noise_sigma**2)
        c0 = self.c0_sigma * float(task.std_m00)
        cfg = FpfsConfig(npix=npix, kmax_thres=1e-12, sigma_shapelets1=self.sigma_shapelets, c0=c0)
        self._setup[npix] = (cfg, psf_arr)
        return self._setup[npix]

    def measure(self, stamps):
        """Raw FPFS quantities: dict with ``e`` (N, 2), ``R`` (N, 2) = (de1/dg1, de2/dg2),
        ``flux`` and ``s2n`` (N,), and ``failed`` (N,) bool."""
        arr = as_stamp_batch(stamps)
        n, ny, nx = arr.shape
        if ny != nx:
            raise ValueError(f"FPFS needs square stamps, got {ny}x{nx}")
        _, _, process_image, zp_ref = self._api
        cfg, psf_arr = self._prepare(nx)
        det = np.array([((ny - 1) / 2.0, (nx - 1) / 2.0)], dtype=[("y", "f8"), ("x", "f8")])
        e = np.full((n, 2), np.nan)
        resp = np.full((n, 2), np.nan)
        flux = np.full(n, np.nan)
        s2n = np.full(n, np.nan)
        for i in range(n):
            st = arr[i]
            if not np.all(np.isfinite(st)) or not np.any(st != 0):
                continue
            try:
                out = process_image(
                    fpfs_config=cfg, pixel_scale=self.pixel_scale,
                    noise_variance=self.noise_sigma**2, mag_zero=zp_ref,
                    gal_array=np.ascontiguousarray(st), psf_array=psf_arr, detection=det,
                )
            except (RuntimeError, ValueError):
                continue
            r = out[0]
            e[i] = (r["fpfs1_e1"], r["fpfs1_e2"])
            resp[i] = (r["fpfs1_de1_dg1"], r["fpfs1_de2_dg2"])
            flux[i] = r["flux_fpfs1"]
            s2n[i] = r["s2n_fpfs1"]
        failed = ~(np.all(np.isfinite(e), axis=1) & np.all(np.isfinite(resp), axis=1))
        e[failed] = np.nan
        resp[failed] = np.nan
        return {"e": e, "R": resp, "flux": flux, "s2n": s2n, "failed": failed}

    def estimate(self, stamps):
        """Shear estimates ``(N, 2)`` (NaN rows on failure) and ``failed`` ``(N,)`` bool."""
        m = self.measure(stamps)
        e, resp, failed = m["e"], m["R"], m["failed"].copy()
        if self.response == "none":
            g = e.copy()
        elif self.response == "individual":
            with np.errstate(divide="ignore", invalid="ignore"):
                g = e / resp
        else:
            if np.all(failed):
                g = e.copy()
            else:
                g = e / np.mean(resp[~failed], axis=0)
        bad = failed | ~np.all(np.isfinite(g), axis=1)
        g[bad] = np.nan
        return g, bad

    def __repr__(self) -> str:
        return (f"FPFSEstimator(sigma_shapelets={self.sigma_shapelets}, c0_sigma={self.c0_sigma}, "
                f"response={self.response!r})")
