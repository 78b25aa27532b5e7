"""Render a mock CLASH cluster field: 7 filters + weights, a baseline catalogue and the truth.

    python -m wlshear.tasks.mock_field out=outputs/clash_mock
    python -m wlshear.tasks.mock_field out=outputs/mock3e14 mock.m200=3e14 mock.size=800 seed=1

Composes ``conf/mock_field.yaml``: ``mock.*`` are the field's settings
(:class:`wlshear.clash.mock.MockConfig`), the galaxy source, noise, PSF and GalSim settings come
from the ``data`` group. ``infer_clash.py`` runs on the result unchanged (its default cluster reads
``outputs/clash_mock``).
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from wlshear.clash.io import DEFAULT_FILTERS
from wlshear.clash.mock import MockConfig, make_mock_field
from wlshear.tasks.relations import MOCK_FIELD_RELATIONS
from wlshear.tasks.rules import MOCK_FIELD_RULES
from wlshear.utils.hydra import cli_main


#: ``python -m wlshear.tasks.mock_field key=value ...``
main = cli_main("mock_field", lambda cfg: mock_field(cfg), MOCK_FIELD_RULES, MOCK_FIELD_RELATIONS,
                example="python -m wlshear.tasks.mock_field out=outputs/clash_mock", doc=__doc__)


def mock_config(cfg: DictConfig) -> MockConfig:
    """The :class:`MockConfig` of a composed ``conf/mock_field.yaml``."""
    mock = OmegaConf.to_container(cfg.mock, resolve=True)
    data = cfg.data
    for key in ("center", "star_mag_range", "shallow_rect", "masked_rect", "nan_rect"):
        if mock.get(key) is not None:
            mock[key] = tuple(mock[key])
    mock["filters"] = tuple(mock["filters"]) if mock.get("filters") else DEFAULT_FILTERS
    return MockConfig(**mock, seed=int(cfg.seed), progress=bool(cfg.progress), source=instantiate(data.source),
                      psf_fwhm=float(data.psf_fwhm), pixel_scale=float(data.pixel_scale),
                      noise_kernel=data.noise_kernel, noise_scale=float(data.noise_scale),
                      gsparams=OmegaConf.to_container(data.gsparams, resolve=True))


def mock_field(cfg: DictConfig) -> int:
    s = make_mock_field(mock_config(cfg), cfg.out)
    print(
        f"wrote mock field {s['cluster']} ({s['shape'][1]}x{s['shape'][0]} px, {s['n_galaxies']} galaxies, "
        f"{s['n_stars']} stars, {s['n_baseline']} baseline shapes, moments response "
        f"{s['baseline_calibration']['response']:.3f}) to {s['out_dir']} in {s['wall_time_s']:.1f} s\n"
        f"  truth: {s['files']['truth']}\n  catalogue: {s['files']['catalogue']}\n  summary: {s['files']['summary']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
