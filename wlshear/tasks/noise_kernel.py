"""Measure the 7x7 background noise kernel of a (total) image and save it as .npy + .txt.

    python -m wlshear.tasks.noise_kernel image=total.fits weight=ivar.fits out=kernel.npy

Composes ``conf/noise_kernel.yaml``; the method is :func:`wlshear.clash.noise_kernel.measure_noise_kernel`.
The kernel file can be given to the simulations as ``data.noise_kernel=kernel.npy``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from wlshear.clash.io import read_image
from wlshear.clash.noise_kernel import measure_noise_kernel
from wlshear.tasks.relations import NOISE_KERNEL_RELATIONS
from wlshear.tasks.rules import NOISE_KERNEL_RULES
from wlshear.utils.hydra import cli_main


#: ``python -m wlshear.tasks.noise_kernel key=value ...``
main = cli_main("noise_kernel", lambda cfg: noise_kernel(cfg), NOISE_KERNEL_RULES, NOISE_KERNEL_RELATIONS,
                example="python -m wlshear.tasks.noise_kernel image=total.fits out=kernel.npy", doc=__doc__)


def noise_kernel(cfg: DictConfig) -> int:
    image = read_image(cfg.image)[0]
    ivar = read_image(cfg.weight)[0] if cfg.weight else None
    kernel, info = measure_noise_kernel(
        image, ivar, size=int(cfg.size), stride=int(cfg.stride), detect_thresh=float(cfg.detect_thresh),
        dilate=int(cfg.dilate), min_ivar=cfg.min_ivar, min_ivar_frac=float(cfg.min_ivar_frac), return_info=True,
    )
    out = Path(cfg.out)
    np.save(out, kernel)
    header = (
        f"{cfg.size}x{cfg.size} background noise kernel (image counts) from {cfg.image}; "
        f"{info['n_patches']} patches; sum {kernel.sum():.6e}; sqrt(sum sq) {np.sqrt((kernel**2).sum()):.6e}"
    )
    np.savetxt(out.with_suffix(".txt"), kernel, fmt="%.6e", header=header)
    print(f"wrote {out} and {out.with_suffix('.txt')}: {header}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
