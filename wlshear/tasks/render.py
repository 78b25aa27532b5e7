"""Render CLASH-like galaxy stamps to a file, plus a PNG grid of normalised stamps.

    python -m wlshear.tasks.render n=1000 out=stamps.fits
    python -m wlshear.tasks.render n=200 out=st.npz ring=true test_mode=true data/noise=half

Composes ``conf/render.yaml``: the galaxies (``data/source=...``), noise level (``data/noise=...``
or ``data.noise_scale``), PSF, GalSim settings and backend are the ``data`` group's, so the stamps
are those train.py and evaluate.py render. ``test_mode=true`` uses the evaluation augmentation
(rotation and mirror only). Writes ``out`` (``.npz`` or ``.fits``, see ``StampBatch.save``) and
``grid`` (default ``<out>.png``). Exits with 1 (writing nothing) when every stamp failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from wlshear.metrics.plots import plot_stamp_grid
from wlshear.tasks.relations import RENDER_RELATIONS
from wlshear.tasks.rules import RENDER_RULES
from wlshear.utils.hydra import cli_main


#: ``python -m wlshear.tasks.render key=value ...``
main = cli_main("render", lambda cfg: render(cfg), RENDER_RULES, RENDER_RELATIONS,
                example="python -m wlshear.tasks.render n=1000 out=stamps.fits", doc=__doc__)


def render(cfg: DictConfig) -> int:
    """Render ``cfg.n`` stamps and write them with their grid image; returns the exit status."""
    dm = instantiate(cfg.data, train_population=cfg.population, eval_population=cfg.population)
    renderer = dm.eval_renderer if cfg.test_mode else dm.train_renderer
    batch = renderer.simulate(int(cfg.n), int(cfg.seed), ring=bool(cfg.ring), progress=True)
    if len(batch) == 0:
        print(f"error: all {cfg.n} stamps failed to render (nothing written); first failure: "
              f"{batch.failures[0] if batch.failures else '?'}", file=sys.stderr)
        return 1
    out = batch.save(cfg.out)
    grid = Path(cfg.grid) if cfg.grid else out.with_suffix(".png")
    k = min(len(batch), 64)
    titles = [f"g=({g1:+.2f},{g2:+.2f})" for g1, g2 in zip(batch.meta["g1"][:k], batch.meta["g2"][:k])]
    plot_stamp_grid(batch.stamps[:k], grid, titles=titles)
    print(f"wrote {len(batch)} stamps to {out} ({len(batch.failures)} failed and skipped); grid: {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
