"""Types and ranges of every entry point's config: train.py, evaluate.py, infer_clash.py and the
command-line tasks (``python -m wlshear.tasks.<name> key=value ...``).

Each table maps a full config key to a :class:`~wlshear.utils.validate.Rule`;
:mod:`wlshear.tasks.relations` checks keys against each other. The entry points call
``validate_config(cfg, TABLE, what, RELATIONS)`` before anything is built or rendered. The
``data`` group's table is ``wlshear.data.rules.DATA_RULES``.
"""

from __future__ import annotations

from wlshear.calibration.surface import FEATURES
from wlshear.data.rules import DATA_RULES, POPULATIONS
from wlshear.sim.render import _BACKENDS, STAMP_SUFFIXES
from wlshear.utils.validate import (
    Bool,
    Choice,
    Choices,
    File,
    Float,
    Floats,
    Int,
    Pair,
    Rule,
    Str,
    prefixed,
)

__all__ = ["TRAIN_RULES", "EVALUATE_RULES", "INFER_CLASH_RULES", "FIT_SURFACE_RULES", "RENDER_RULES",
           "MOCK_FIELD_RULES", "NOISE_KERNEL_RULES", "SUMMARIZE_RULES"]

MODEL_RULES: dict[str, Rule] = {
    "optimizer.lr": Float(0, 10, lo_open=True),
    "net.dropout": Float(0, 1, hi_open=True),
    "net.stamp_size": Int(5, 256, "pixels"),
    "shear_max": Float(0, 1, lo_open=True, hi_open=True),
    "scheduler.factor": Float(0, 1, lo_open=True, hi_open=True),
    "scheduler.patience": Int(0),
    "scheduler.min_lr": Float(0),
    "symmetrize_eval": Bool(),
    "symmetrize_train": Bool(),
    "objective.slope_weight": Float(0),
    "objective.mse_weight": Float(0),
    "objective.target_slope": Float(0, 10, lo_open=True),
    "objective.debias": Bool(),
}

TRAINER_RULES: dict[str, Rule] = {
    "max_epochs": Int(-1, note="-1 = no limit"),
    "min_epochs": Int(0, nullable=True),
    "max_steps": Int(-1, note="-1 = no limit"),
    "log_every_n_steps": Int(1),
    "check_val_every_n_epoch": Int(1, nullable=True),
    "num_sanity_val_steps": Int(-1),
    "deterministic": Bool(),
}

REFIT_RULES: dict[str, Rule] = {
    "enabled": Bool(),
    "n": Int(1, specials=("auto",), note="refit stamps; 'auto': 2 x (features + 1) of the network"),
    "batch_size": Int(1),
    "symmetric": Bool(note="refit the head of the 8-fold symmetry average (no intercept: c = 0 exactly)"),
    "ring": Bool(note="refit stamps in 90-degree ring pairs (the calibration fit cancels shape noise)"),
    "allow_untrained": Bool(note="write estimator_refit.pt even when no training step ran"),
}


METACAL_RULES: dict[str, Rule] = {
    "reconv_factor": Float(1, lo_open=True, note="reconvolution FWHM / PSF FWHM (must exceed 1)"),
    "step": Float(0, 0.2, lo_open=True, hi_open=True, note="the metacal shear d"),
    "fixnoise": Bool(),
    "fixnoise_scheme": Choice("isotropic", "ngmix"),
    "interpolant": Choice("sinc", "quintic"),
    "maxk_threshold": Float(0, 1, lo_open=True, hi_open=True),
    "oversample": Int(2),
    "margin": Int(0, 64, "pixels: input stamps are stamp_size + 2 margin"),
}

TRAIN_RULES: dict[str, Rule] = {
    "seed": Int(0),
    "train": Bool(),
    "auto_resume": Bool(),
    **prefixed("data", DATA_RULES),
    **prefixed("model", MODEL_RULES),
    **prefixed("trainer", TRAINER_RULES),
    **prefixed("refit", REFIT_RULES),
    **prefixed("metacal", METACAL_RULES),
    "evaluate.enabled": Bool(),
    "evaluate.symmetrize": Bool(),
    "evaluate.baselines": Bool(note="also run the baselines group (default moments, fpfs) on the test stamps"),
    "evaluate.bootstrap": Int(0, note="resamples for the baseline rows' sigma errors (0: none)"),
    "optimized_metric": Str(nullable=True, note="the metrics.json key train.py returns to a sweeper (hparams_search)"),
}

EVALUATE_RULES: dict[str, Rule] = {
    "seed": Int(0),
    **prefixed("data", DATA_RULES),
    "trust_checkpoints": Bool(),
    "symmetrize": Rule("bools", note="evaluate without (false) and/or with (true) the symmetry average"),
    "batch_size": Int(1),
    "test.n": Int(2, note="test stamps"),
    "test.ring": Bool(),
    "test.seed_offset": Int(0),
    "test.backend": Choice(lambda: tuple(sorted(_BACKENDS)), nullable=True,
                           note="renderer backend of every set evaluate draws (null: data.backend)"),
    "test.check_n": Int(0, note="test stamps redrawn by GalSim to check a faster backend (0: no check)"),
    "bootstrap": Int(0),
    "target_sigma_m": Float(0, lo_open=True),
    "plots.scatter": Bool(),
    "studies.metacal.enabled": Bool(),
    "studies.metacal.n": Int(2, nullable=True, note="test stamps for the metacal rows"),
    "studies.metacal.real.enabled": Bool(),
    "studies.metacal.real.n_orient": Int(1, note="orientations per real galaxy"),
    "studies.metacal.real.shear": Float(0, 0.2, lo_open=True),
    "studies.metacal.margin": Int(0, 64, nullable=True, note="px beyond each stamp edge; null: the estimators' own"),
    "studies.metacal.real.mask_stage": Choice("source", "image"),
    "studies.magnitude.enabled": Bool(),
    "studies.magnitude.key": Choice("mag", "mag_source"),
    "studies.magnitude.bins": Rule("bins", 1),
    "studies.conditional.enabled": Bool(),
    "studies.conditional.all_estimators": Bool(),
    "studies.shear.enabled": Bool(),
    "studies.shear.bins": Int(1),
    "studies.shear.range": Pair(-1, 1),
    "studies.centroid.enabled": Bool(),
    "studies.centroid.n": Int(2),
    "studies.centroid.shifts_hlr": Floats(0, 10, "half-light radii"),
    "studies.centroid.distribution": Choice("uniform", "direction",
                                            note="uniform per axis over s hlr (paper) or length s hlr, random direction"),
    "studies.background.enabled": Bool(),
    "studies.background.n": Int(1, nullable=True),
    "studies.background.offsets_sigma": Floats(-1e3, 1e3, "x noise sigma"),
    "studies.noise.enabled": Bool(),
    "studies.noise.n": Int(2),
    "studies.noise.levels": Floats(0, 100, "x the CLASH noise kernel"),
    "studies.noise.sweep_dir": Str(nullable=True, note="a train.py multirun: its jobs' models per data.noise_scale"),
}

INFER_CLASH_RULES: dict[str, Rule] = {
    "seed": Int(0),
    "symmetrize": Bool(),
    "batch_size": Int(1),
    "shear_calibration": Choice("simulation", "metacal", note="the estimator's own calibration, or metacal responses"),
    "allow_uncalibrated": Bool(note="accept an estimator without a fitted calibration (e.g. a Lightning .ckpt)"),
    "catalogue_frame": Choice("sky", "pixel", note="frame of the baseline catalogues' G1/G2"),
    "io.min_weight": Float(0),
    "io.require_all_filters": Bool(),
    "detection.thresh": Float(0, lo_open=True, note="x per-pixel error"),
    "detection.minarea": Int(1, note="pixels"),
    "detection.deblend_nthresh": Int(1),
    "detection.deblend_cont": Float(0, 1),
    "detection.bkg_box": Int(1, note="pixels"),
    "detection.match_radius_arcsec": Float(0, lo_open=True),
    "cuts.min_mean_ivar": Float(0),
    "cuts.require_match": Bool(),
    "cuts.star_plot": Bool(),
    "maps.scales_arcsec": Floats(0, lo_open=True),
    "maps.cell_arcsec": Float(0, lo_open=True),
    "maps.n_boot": Int(2),
    "maps.whisker_every": Int(1, nullable=True),
    "maps.min_count": Float(0, note="kernel-weighted galaxies below which a map cell is masked"),
    "holdout_fraction": Float(0, 1, lo_open=True, hi_open=True),
    "calibration.sample_fraction": Float(0, 1, lo_open=True),
    "calibration.min_points": Int(3),
    "calibration.positions": Choice("uniform", "galaxies", note="where the two maps are compared"),
    "calibration.n_boot": Int(0),
    "calibration.n_boot_clusters": Int(0),
    "profile.bins_arcsec": Floats(0, min_len=2, increasing=True, note="annulus edges, arcsec"),
    "profile.min_per_bin": Int(1),
    "fail_exit_code": Int(0, 255),
    "progress": Bool(),
}

#: ``python -m wlshear.tasks.render`` (conf/render.yaml)
RENDER_RULES: dict[str, Rule] = {
    "seed": Int(0),
    "n": Int(1, 10**8, "stamps"),
    "out": File(*STAMP_SUFFIXES),
    "grid": File(".png", ".pdf", ".svg", ".jpg", ".jpeg", nullable=True, note="null = <out>.png"),
    "ring": Bool(),
    "test_mode": Bool(note="rotation and mirror only"),
    "population": Choice(*POPULATIONS),
    **prefixed("data", DATA_RULES),
    "data.noise_kernel": File(".npy", ".txt", must_exist=True, nullable=True, note="null = the embedded CLASH kernel"),
    "data.target_catalog": File(must_exist=True, nullable=True, note="the (mag, hlr_px) table of population=matched"),
}

#: ``python -m wlshear.tasks.mock_field`` (conf/mock_field.yaml)
MOCK_FIELD_RULES: dict[str, Rule] = {
    "seed": Int(0),
    "out": Str(note="output directory"),
    "progress": Bool(),
    **prefixed("data", {**DATA_RULES, "noise_scale": Float(0, 100, "x the CLASH kernel; > 0: the weight maps "
                                                                   "are 1/sigma^2", lo_open=True)}),
    **prefixed("mock", {
        "cluster": Str(note="used in the file names"),
        "size": Int(64, 100000, "field side in pixels"),
        "n_galaxies": Int(1, nullable=True, note="null: density_per_arcmin2 x area"),
        "min_sep_px": Float(0, note="minimum separation of objects [px]"),
        "stamp_size": Int(8, 1024, "side of each galaxy's drawn stamp [px]"),
        "m200": Float(0, lo_open=True, note="NFW M200 [Msun]"),
        "conc": Float(0, 100, "NFW concentration", lo_open=True),
        "z_lens": Float(0, 10, lo_open=True),
        "z_source": Float(0, 20, lo_open=True),
        "center": Floats(length=2, nullable=True, note="[x, y] lens centre in pixels; null = image centre"),
        "magnification": Bool(),
        "n_stars": Int(0),
        "star_mag_range": Pair(0, 40),
        "shallow_rect": Floats(length=4, nullable=True, note="[x0, y0, w, h] field fractions"),
        "shallow_depth": Float(0, 1, lo_open=True),
        "masked_rect": Floats(length=4, nullable=True, note="[x0, y0, w, h] field fractions"),
        "nan_rect": Floats(length=4, nullable=True, note="[x0, y0, w, h] field fractions"),
        "baseline_response": Float(0, lo_open=True, nullable=True, note="null: measured on n_calib stamps"),
        "n_calib": Int(10),
        "ra0": Float(0, 360),
        "dec0": Float(-90, 90),
        "wcs_rotation_deg": Float(-360, 360),
        "density_per_arcmin2": Float(0, lo_open=True, nullable=True, note="sources per arcmin^2 (paper: 37)"),
    }),
}

#: ``python -m wlshear.tasks.noise_kernel`` (conf/noise_kernel.yaml)
NOISE_KERNEL_RULES: dict[str, Rule] = {
    "image": File(".fits", ".fit", ".fits.gz", must_exist=True),
    "weight": File(".fits", ".fit", ".fits.gz", must_exist=True, nullable=True),
    "out": File(".npy"),
    "size": Int(1, 63, "kernel side [px], odd"),
    "stride": Int(1),
    "detect_thresh": Float(0, lo_open=True),
    "dilate": Int(0),
    "min_ivar": Float(0, nullable=True, note="absolute ivar floor"),
    "min_ivar_frac": Float(0, 1, "floor as a fraction of the median ivar"),
}

#: ``python -m wlshear.tasks.fit_surface`` (conf/fit_surface.yaml)
FIT_SURFACE_RULES: dict[str, Rule] = {
    "seed": Int(0),
    "estimator": File(".pt", ".ckpt", must_exist=True),
    "out": File(".pt"),
    **prefixed("data", DATA_RULES),
    **prefixed("surface", {
        "n": Int(40, note="stamps (ring pairs: n/2 galaxies)"),
        "seed": Int(0, note="seed of the fitting set"),
        "features": Choices(*sorted(FEATURES)),
        "basis": Choice("poly", "linear"),
        "degree": Int(0, 10, "total polynomial degree (basis poly)"),
        "stages": Int(1, 10, "successive surface stages"),
        "n_knots": Int(2, 100, "knots per feature (basis linear)"),
        "symmetrize": Bool(),
        "workers": Int(0, 256, "rendering worker processes"),
    }),
}

#: ``python -m wlshear.tasks.summarize`` (conf/summarize.yaml)
SUMMARIZE_RULES: dict[str, Rule] = {
    "dir": Str(note="a Hydra multirun directory"),
    "out": Str(nullable=True, note="output path stem; null = <dir>/summary"),
    "group_by": Str(),
    "x": Str(),
    "plot": Bool(),
}
