"""Point-spread function of the simulated CLASH stamps."""

from __future__ import annotations

import galsim

from wlshear.sim.constants import PSF_FWHM


def make_psf(fwhm_arcsec: float = PSF_FWHM, gsparams: galsim.GSParams | None = None) -> galsim.GSObject:
    """Isotropic Gaussian PSF with the given FWHM [arcsec] (paper: 0.121", release: 0.12")."""
    if not fwhm_arcsec > 0:
        raise ValueError(f"PSF FWHM must be positive (arcsec), got {fwhm_arcsec!r}")
    return galsim.Gaussian(fwhm=fwhm_arcsec, gsparams=gsparams)

