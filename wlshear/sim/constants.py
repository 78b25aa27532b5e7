"""Observing-setup constants of the CLASH/HST ACS stamps (Springer et al. 2018; method.md).

The one place where the pixel scale, PSF, zero-points and the fast GalSim settings are written
down: every module (simulation, baselines, field pipeline) and benchmark imports them from here.
These are defaults only: every one of them is also a config value (``conf/data/default.yaml``).
"""

#: Target pixel scale of CLASH ACS drizzled images [arcsec / pixel].
PIXEL_SCALE = 0.065
#: Stamp side [pixels]. The galaxy centre is at 0-indexed pixel (15.5, 15.5).
STAMP_SIZE = 32
#: FWHM of the isotropic Gaussian PSF [arcsec] (paper text; the release's configs use 0.12).
PSF_FWHM = 0.121
#: AB zero-point of the CLASH total images (stamp pixel values are counts at this zero-point;
#: the AB magnitude of 1 count/s in the CLASH mosaics).
ZP_CLASH = 25.4193
#: AB zero-point of the COSMOS F814W source images.
ZP_COSMOS = 25.9553
#: COSMOS source pixel scale [arcsec / pixel].
COSMOS_PIXEL_SCALE = 0.03
#: Size rescaling of COSMOS sources, (0.065 / 0.03) / 4; flux is rescaled by ALPHA_RESCALE**2.
ALPHA_RESCALE = 0.5416667
#: Pixels of rendered COSMOS sources below this value are set to 0 (3.5 x rescaled COSMOS sigma).
COSMOS_MASK_THRESHOLD = 0.012
#: Flux factor applied after masking (0.7 mag shift plus the zero-point difference).
COSMOS_FLUX_FACTOR = 0.3203
#: Half-width of the uniform shear prior: g1, g2 ~ U(-SHEAR_MAX, SHEAR_MAX).
SHEAR_MAX = 0.2
#: GalSim drawing settings measured ~3.5x faster than GalSim's defaults with |de| <= 7e-4
#: (the ``data.gsparams`` default; mock fields, benchmarks and tests use the same).
FAST_GSPARAMS = {"minimum_fft_size": 64, "folding_threshold": 1e-2, "maxk_threshold": 3e-3}
