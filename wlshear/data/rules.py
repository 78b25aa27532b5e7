"""Types and ranges of the ``data`` config group (``conf/data``): the keys of
:class:`~wlshear.data.ShearDataModule` and of its galaxy source, relative to ``data``.

Checked by the data module on its own arguments and, with the ``data.`` prefix, by every entry
point before anything is rendered (``wlshear.tasks.rules``). Rule vocabulary: ``wlshear.utils.validate``.
"""

from __future__ import annotations

from wlshear.sim.render import _BACKENDS
from wlshear.utils.validate import Bool, Choice, File, Float, Floats, Int, Pair, Rule

__all__ = ["DATA_RULES", "POPULATIONS"]

POPULATIONS = ("natural", "homogenised", "matched")

#: ``data`` group (ShearDataModule and its source), relative keys.
DATA_RULES: dict[str, Rule] = {
    "noise_scale": Float(0, 100, "x the CLASH noise kernel; 0 = noiseless, paper: 1, 0.5, 0.25"),
    "psf_fwhm": Float(0, 2, "arcsec", lo_open=True),
    "pixel_scale": Float(0, 1, "arcsec per pixel", lo_open=True),
    "stamp_size": Int(8, 256, "pixels; the networks take 32"),
    "backend": Choice(lambda: tuple(sorted(_BACKENDS)), note="renderer backends registered in wlshear.sim.render"),
    "noise_kernel": File(".npy", ".txt", nullable=True, note="null = the embedded CLASH kernel"),
    "train_population": Choice(*POPULATIONS),
    "eval_population": Choice(*POPULATIONS),
    "samples_per_epoch": Int(1),
    "val_size": Int(1),
    "test_size": Int(1),
    "refit_size": Int(0, specials=("auto",), note="'auto': 2 x (features + 1) of the network"),
    "test_ring": Bool(),
    "batch_size": Int(1),
    "eval_batch_size": Int(1),
    "num_workers": Int(0, 256),
    "chunk": Int(1),
    "render_margin": Int(0, 64, "pixels rendered beyond each stamp edge (the metacal operator's input margin)"),
    "render_on_device": Bool(),
    "split.enabled": Bool(note="galaxy-disjoint training / test split"),
    "split.test_fraction": Float(0, 1, "fraction of galaxy ids on the test side", lo_open=True, hi_open=True),
    "split.seed": Int(0),
    "seed": Int(0),
    "group_size": Int(2, note="stamps per galaxy group"),
    "same_noise": Bool(),
    "max_failure_fraction": Float(0, 1, "largest fraction of a cached set's stamps allowed to fail to render"),
    "stream_max_failure_fraction": Float(0, 1, "largest running fraction of training stamps allowed to fail"),
    "augment.rotation": Bool(),
    "augment.mirror": Bool(),
    "augment.mirror_prob": Float(0, 1),
    "augment.magnification": Pair(0, 10, "uniform magnification range; null = none", lo_open=True, nullable=True),
    "augment.shift": Float(0, 16, "pixels"),
    "augment.shear_max": Float(0, 1, lo_open=True, hi_open=True),
    "augment.shear_prior": Choice("uniform", "gaussian"),
    "augment.shear_sigma": Float(0, 1, lo_open=True),
    # parametric source
    "source.n_galaxies": Int(1),
    "source.mag_sd": Float(0, 10, lo_open=True),
    "source.mag_range": Pair(0, 40, "magnitudes; null = no cut (COSMOS)", nullable=True),
    "source.hlr_median_px": Float(0, 100, "pixels", lo_open=True),
    "source.hlr_log_scatter": Float(0, 2),
    "source.hlr_range_px": Pair(0, 1000, "pixels", lo_open=True),
    "source.p_bulge_disk": Float(0, 1),
    "source.bulge_hlr_ratio": Float(0, 10, lo_open=True),
    "source.bulge_frac_range": Pair(0, 1),
    "source.sersic_grid": Floats(0.3, 6.2, "GalSim Sersic indices"),
    "source.p_knots": Float(0, 1),
    "source.knot_frac_range": Pair(0, 1),
    "source.n_knots": Int(1, 25),
    "source.e_sigma": Float(0, 1, lo_open=True),
    "source.e_max": Float(0, 1, lo_open=True, hi_open=True),
    # COSMOS source
    "source.use_real": Bool(),
    "source.exclusion_level": Choice("none", "bad_stamp", "bad_fits", "marginal"),
    "source.alpha": Float(0, 10, lo_open=True),
    "source.mask_threshold": Float(0, note="pre-mask counts", nullable=True),
    "source.mask_stage": Choice("image", "source", note="mask each lensed stamp (paper) or the unlensed galaxy"),
    "source.flux_factor": Float(0, note="-> CLASH counts", lo_open=True),
}
