"""Config validation at start-up: every checked key has a type and an allowed range.

The tables below map a full config key (``data.noise_scale``) to a :class:`Rule`. The Hydra tasks
(train, evaluate, infer_clash) call :func:`validate_config` before anything is built or rendered,
and :class:`~wlshear.data.ShearDataModule` checks its own arguments with the same ``data`` table,
so a bad value gives one ``ConfigError`` (a ``ValueError``) that lists every offending key, its
value and what is allowed, e.g.::

    invalid config value(s):
      data.noise_scale = -1.0: must be a number in [0, 100] (x the CLASH noise kernel; 0 = noiseless)

Keys absent from a config are not checked (groups differ between model and source options);
unset mandatory values (``???``) are reported by the tasks' own ``check_required``. Relations
between keys (e.g. the data stamp size must equal the network's) are in :data:`RELATIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "ConfigError",
    "Rule",
    "validate_config",
    "validate_values",
    "TRAIN_RULES",
    "EVALUATE_RULES",
    "INFER_CLASH_RULES",
    "FIT_SURFACE_RULES",
    "DATA_RULES",
]


class ConfigError(ValueError):
    """One or more config values have the wrong type or lie outside their allowed range."""


_MISSING = object()


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


@dataclass(frozen=True)
class Rule:
    """Type and range of one config value.

    kind: ``int``, ``float`` (any real number), ``bool``, ``str``, ``choice`` (one of ``choices``),
        ``floats`` (a list of numbers, each in the range), ``pair`` (two numbers lo <= hi in the
        range), ``bools`` (a list of true/false), ``bins`` (an int >= lo, or an increasing list of
        numbers).
    lo, hi: inclusive bounds (None = unbounded); ``lo_open`` / ``hi_open`` make them exclusive.
    nullable: None (YAML ``null``) is allowed.
    min_len: minimum list length for list kinds.
    increasing: list kinds must be strictly increasing.
    note: what the value means, appended to the message.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | Callable[[], Sequence] = ()
    nullable: bool = False
    min_len: int = 1
    increasing: bool = False
    note: str = ""
    specials: tuple = ()  # values accepted as they are (e.g. "auto"), besides the kind's

    # -- description --------------------------------------------------------------------------
    def _range(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is None and hi is None:
            return ""
        if hi is None:
            return f" {'>' if self.lo_open else '>='} {_num(lo)}"
        if lo is None:
            return f" {'<' if self.hi_open else '<='} {_num(hi)}"
        return f" in {'(' if self.lo_open else '['}{_num(lo)}, {_num(hi)}{')' if self.hi_open else ']'}"

    def _choices(self) -> tuple:
        c = self.choices() if callable(self.choices) else self.choices
        return tuple(c)

    def describe(self) -> str:
        k = self.kind
        if k == "int":
            s = "an integer" + self._range()
        elif k == "float":
            s = "a number" + self._range()
        elif k == "bool":
            s = "true or false"
        elif k == "str":
            s = "a string"
        elif k == "choice":
            s = "one of " + ", ".join(repr(c) for c in self._choices())
        elif k == "floats":
            s = f"a list of {'>= ' + str(self.min_len) + ' ' if self.min_len > 1 else ''}numbers" + (
                f", each{self._range()}" if self._range() else "") + (", increasing" if self.increasing else "")
        elif k == "pair":
            s = "a list of two numbers [lo, hi] with lo <= hi" + (f", both{self._range()}" if self._range() else "")
        elif k == "bools":
            s = "a list of true/false values"
        elif k == "bins":
            s = f"an integer{self._range()} (number of bins) or an increasing list of bin edges"
        else:  # pragma: no cover - table error
            raise ValueError(f"unknown rule kind {k!r}")
        if self.nullable:
            s = "null or " + s
        if self.specials:
            s = s + " or " + " or ".join(repr(v) for v in self.specials)
        return s + (f" ({self.note})" if self.note else "")

    # -- checking -----------------------------------------------------------------------------
    def _in_range(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    @staticmethod
    def _is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def _number_ok(self, v: Any, integer: bool = False) -> bool:
        if not self._is_number(v):
            return False
        if integer and not float(v).is_integer():
            return False
        return self._in_range(float(v))

    def _list_ok(self, v: Any, check_item: Callable[[Any], bool]) -> bool:
        if not isinstance(v, (list, tuple)) or len(v) < self.min_len:
            return False
        if not all(check_item(x) for x in v):
            return False
        if self.increasing and any(float(b) <= float(a) for a, b in zip(v, v[1:])):
            return False
        return True

    def ok(self, v: Any) -> bool:
        if self.specials and isinstance(v, str) and v in self.specials:
            return True
        return self._ok(v)

    def _ok(self, v: Any) -> bool:
        """True when ``v`` satisfies the rule."""
        if v is None:
            return self.nullable
        k = self.kind
        if k == "int":
            return self._number_ok(v, integer=True)
        if k == "float":
            return self._number_ok(v)
        if k == "bool":
            return isinstance(v, bool)
        if k == "str":
            return isinstance(v, str)
        if k == "choice":
            return isinstance(v, str) and v in self._choices()
        if k == "floats":
            return self._list_ok(v, self._number_ok)
        if k == "pair":
            return (isinstance(v, (list, tuple)) and len(v) == 2 and all(self._number_ok(x) for x in v)
                    and float(v[0]) <= float(v[1]))
        if k == "bools":
            return self._list_ok(v, lambda x: isinstance(x, bool))
        if k == "bins":
            if isinstance(v, (list, tuple)):
                return (len(v) >= 2 and all(self._is_number(x) and math.isfinite(float(x)) for x in v)
                        and all(float(b) > float(a) for a, b in zip(v, v[1:])))
            return self._number_ok(v, integer=True)
        raise ValueError(f"unknown rule kind {k!r}")  # pragma: no cover - table error


# ---------------------------------------------------------------------------------------------
# shorthand constructors for the tables

def Int(lo=None, hi=None, note="", **kw) -> Rule:  # noqa: N802 - table vocabulary
    return Rule("int", lo, hi, note=note, **kw)


def Float(lo=None, hi=None, note="", **kw) -> Rule:  # noqa: N802
    return Rule("float", lo, hi, note=note, **kw)


def Bool(note="", **kw) -> Rule:  # noqa: N802
    return Rule("bool", note=note, **kw)


def Choice(*choices, note="", **kw) -> Rule:  # noqa: N802
    return Rule("choice", choices=choices if not (len(choices) == 1 and callable(choices[0])) else choices[0],
                note=note, **kw)


def Floats(lo=None, hi=None, note="", **kw) -> Rule:  # noqa: N802
    return Rule("floats", lo, hi, note=note, **kw)


def Pair(lo=None, hi=None, note="", **kw) -> Rule:  # noqa: N802
    return Rule("pair", lo, hi, note=note, **kw)


def _backends() -> tuple:
    from wlshear.sim.render import _BACKENDS

    return tuple(sorted(_BACKENDS))


POPULATIONS = ("natural", "homogenised", "matched")

#: ``data`` group (ShearDataModule and its source), relative keys.
DATA_RULES: dict[str, Rule] = {
    "noise_scale": Float(0, 100, "x the CLASH noise kernel; 0 = noiseless, paper: 1, 0.5, 0.25"),
    "psf_fwhm": Float(0, 2, "arcsec", lo_open=True),
    "pixel_scale": Float(0, 1, "arcsec per pixel", lo_open=True),
    "stamp_size": Int(8, 256, "pixels; the networks take 32"),
    "backend": Choice(_backends),
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
    "source.flux_factor": Float(0, note="-> CLASH counts", lo_open=True),
}

MODEL_RULES: dict[str, Rule] = {
    "optimizer.lr": Float(0, 10, lo_open=True),
    "net.dropout": Float(0, 1, hi_open=True),
    "net.stamp_size": Int(5, 256, "pixels"),
    "shear_max": Float(0, 1, lo_open=True, hi_open=True),
    "scheduler.factor": Float(0, 1, lo_open=True, hi_open=True),
    "scheduler.patience": Int(0),
    "scheduler.min_lr": Float(0),
    "symmetrize_eval": Bool(),
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


def _prefixed(prefix: str, table: Mapping[str, Rule]) -> dict[str, Rule]:
    return {f"{prefix}.{k}": v for k, v in table.items()}


TRAIN_RULES: dict[str, Rule] = {
    "seed": Int(0),
    "train": Bool(),
    "auto_resume": Bool(),
    **_prefixed("data", DATA_RULES),
    **_prefixed("model", MODEL_RULES),
    **_prefixed("trainer", TRAINER_RULES),
    **_prefixed("refit", REFIT_RULES),
    **_prefixed("metacal", METACAL_RULES),
    "evaluate.enabled": Bool(),
    "evaluate.symmetrize": Bool(),
    "evaluate.report_val_mse": Bool(),
}

EVALUATE_RULES: dict[str, Rule] = {
    "seed": Int(0),
    **_prefixed("data", {**DATA_RULES, "refit_size": Int(0, specials=("auto",))}),
    "trust_checkpoints": Bool(),
    "symmetrize": Rule("bools", note="evaluate without (false) and/or with (true) the symmetry average"),
    "batch_size": Int(1),
    "test.n": Int(2, note="test stamps"),
    "test.ring": Bool(),
    "test.seed_offset": Int(0),
    "bootstrap": Int(0),
    "target_sigma_m": Float(0, lo_open=True),
    "plots.scatter": Bool(),
    "studies.metacal.enabled": Bool(),
    "studies.metacal.n": Int(2, nullable=True, note="test stamps for the metacal rows"),
    "studies.metacal.real.enabled": Bool(),
    "studies.metacal.real.n_orient": Int(1, note="orientations per real galaxy"),
    "studies.metacal.real.shear": Float(0, 0.2, lo_open=True),
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
    "studies.background.enabled": Bool(),
    "studies.background.n": Int(1, nullable=True),
    "studies.background.offsets_sigma": Floats(-1e3, 1e3, "x noise sigma"),
    "studies.noise.enabled": Bool(),
    "studies.noise.n": Int(2),
    "studies.noise.levels": Floats(0, 100, "x the CLASH noise kernel"),
}

#: conf/fit_surface.yaml (the data config of ``python -m wlshear.calibration.fit_surface``)
FIT_SURFACE_RULES: dict[str, Rule] = {"seed": Int(0), **_prefixed("data", {**DATA_RULES, "refit_size": Int(0, specials=("auto",))})}

INFER_CLASH_RULES: dict[str, Rule] = {
    "seed": Int(0),
    "symmetrize": Bool(),
    "batch_size": Int(1),
    "shear_calibration": Choice("simulation", "metacal", note="the estimator's own calibration, or metacal responses"),
    "allow_uncalibrated": Bool(note="accept an estimator without a fitted calibration (e.g. a Lightning .ckpt)"),
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
    "holdout_fraction": Float(0, 1, lo_open=True, hi_open=True),
    "calibration.sample_fraction": Float(0, 1, lo_open=True),
    "calibration.min_points": Int(3),
    "calibration.n_boot": Int(0),
    "profile.bins_arcsec": Floats(0, min_len=2, increasing=True, note="annulus edges, arcsec"),
    "profile.min_per_bin": Int(1),
    "fail_exit_code": Int(0, 255),
    "progress": Bool(),
}


def _same_stamp_size(get: Callable[[str], Any]) -> str | None:
    a, b = get("data.stamp_size"), get("model.net.stamp_size")
    if a is _MISSING or a is None or get("model") is _MISSING:
        return None
    b = 32 if b is _MISSING or b is None else b
    if a != b:
        return (f"data.stamp_size = {a} but the network takes {b}x{b} stamps (model.net.stamp_size = {b}); "
                "set both to the same value")
    return None


def _sizes_vs_groups(get: Callable[[str], Any]) -> str | None:
    k, b = get("data.group_size"), get("data.batch_size")
    if k is _MISSING or b is _MISSING or not isinstance(k, int) or not isinstance(b, int):
        return None
    if b < k:
        return f"data.batch_size = {b} is smaller than data.group_size = {k}; a batch must hold at least one group"
    return None


def _even_ring(n_key: str, ring_key: str) -> Callable[[Callable[[str], Any]], str | None]:
    def check(get: Callable[[str], Any]) -> str | None:
        n, ring = get(n_key), get(ring_key)
        if ring is True and isinstance(n, int) and n % 2:
            return f"{n_key} = {n} must be even: {ring_key} = true renders 90-degree ring pairs"
        return None
    return check


#: checks between keys: (keys, check); a check returns a message or None, and is skipped when one
#: of its keys already broke its own rule
RELATIONS: tuple[tuple[tuple[str, ...], Callable[[Callable[[str], Any]], str | None]], ...] = (
    (("data.stamp_size", "model.net.stamp_size"), _same_stamp_size),
    (("data.group_size", "data.batch_size"), _sizes_vs_groups),
    (("data.test_size", "data.test_ring"), _even_ring("data.test_size", "data.test_ring")),
    (("test.n", "test.ring"), _even_ring("test.n", "test.ring")),
)


# ---------------------------------------------------------------------------------------------

def _plain(v: Any) -> Any:
    if isinstance(v, (DictConfig, ListConfig)):
        return OmegaConf.to_container(v, resolve=True)
    return v


def _getter(cfg: Any) -> Callable[[str], Any]:
    if isinstance(cfg, DictConfig):
        def get(key: str) -> Any:
            try:
                v = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
            except Exception:  # unresolvable interpolation: reported by whoever resolves it
                return _MISSING
            return _plain(v)
        return get

    def get_plain(key: str) -> Any:
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return _MISSING
            node = node[part]
        return _plain(node)
    return get_plain


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v).replace("True", "true").replace("False", "false")


def problems(cfg: Any, rules: Mapping[str, Rule], relations=RELATIONS) -> list[str]:
    """Messages for every value of ``cfg`` (DictConfig or nested dict) that breaks its rule."""
    get = _getter(cfg)
    out, bad = [], set()
    for key, rule in rules.items():
        v = get(key)
        if v is _MISSING or v == "???":
            continue
        if not rule.ok(v):
            bad.add(key)
            kind = " (a string)" if isinstance(v, str) and rule.kind not in ("str", "choice") else ""
            out.append(f"{key} = {_fmt(v)}{kind}: must be {rule.describe()}")
    for keys, rel in relations or ():
        if bad.intersection(keys):
            continue
        msg = rel(get)
        if msg:
            out.append(msg)
    return out


def validate_config(cfg: Any, rules: Mapping[str, Rule], what: str = "config", relations=RELATIONS) -> None:
    """Raise :class:`ConfigError` listing every value of ``cfg`` that breaks ``rules``."""
    msgs = problems(cfg, rules, relations)
    if msgs:
        raise ConfigError(f"invalid {what} value(s) (fix them on the command line or in conf/):\n  "
                          + "\n  ".join(msgs))


def validate_values(values: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str = "",
                    what: str = "argument") -> None:
    """Check plain keyword arguments (``values``) against relative ``rules``; messages name
    ``prefix + key`` (e.g. ``data.noise_scale``) so they match the config key."""
    flat: dict[str, Any] = {}
    for key, rule in rules.items():
        node: Any = values
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                node = _MISSING
                break
            node = node[part]
        if node is not _MISSING:
            flat[prefix + key] = node
    msgs = [f"{k} = {_fmt(v)}: must be {rules[k[len(prefix):]].describe()}"
            for k, v in flat.items() if not rules[k[len(prefix):]].ok(_plain(v))]
    if msgs:
        raise ConfigError(f"invalid {what}(s):\n  " + "\n  ".join(msgs))


# ---------------------------------------------------------------------------------------------
# command-line arguments: argparse ``type=`` functions with the same vocabulary

def cli_type(rule: Rule, parse: Callable[[str], Any] | None = None) -> Callable[[str], Any]:
    """An argparse ``type`` that parses a string (int for ``int`` rules, float for ``float``) and
    checks it against ``rule``; argparse then reports ``argument --n: ... must be an integer >= 1``
    before any work starts."""
    import argparse

    conv = parse or (int if rule.kind == "int" else float)

    def check(text: str) -> Any:
        try:
            v = conv(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} must be {rule.describe()}") from None
        if not rule.ok(v):
            raise argparse.ArgumentTypeError(f"{text} must be {rule.describe()}")
        return v

    check.__name__ = rule.describe()
    return check


def cli_path(suffixes: Sequence[str], must_exist: bool = False) -> Callable[[str], str]:
    """An argparse ``type`` for a file path with one of ``suffixes`` (and, optionally, existing)."""
    import argparse
    from pathlib import Path

    def check(text: str) -> str:
        p = Path(text)
        if suffixes and p.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text!r}: unsupported file type {p.suffix or '(none)'!r}; use "
                                             + " or ".join(suffixes))
        if must_exist and not p.is_file():
            raise argparse.ArgumentTypeError(f"{text!r}: no such file (absolute: {p.resolve()})")
        return text

    check.__name__ = "path"
    return check
