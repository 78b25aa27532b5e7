"""evaluate.py's check of a fast renderer backend against GalSim, in the same run.

When the test sets are drawn by another backend than GalSim (``test.backend: torch``, the
default), the first ``test.check_n`` stamps of the test set's design are drawn again by GalSim,
noiselessly (``StampRenderer.compare_backends``), and both versions get the same noise field. The
record (``results.json["test_set"]["backend_check"]``) holds the pixel agreement (max |residual|
/ peak) and, for every CNN with the symmetry average, the mean and RMS difference of its shear
between the two versions: what the backend choice can do to the figures, beside sigma and m.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)


def backend_check(renderer, n_test: int, seed, ring: bool, check_n: int, cnns: dict,
                  batch_size: int = 256, reference: str = "galsim") -> dict | None:
    """Compare ``renderer``'s backend with ``reference`` on the first ``check_n`` stamps of the
    ``n_test``-stamp design drawn from ``seed`` (as ``CachedStampSet`` draws it); None when the
    renderer already is the reference or ``check_n`` is 0."""
    if renderer.backend == reference or check_n <= 0 or n_test <= 0:
        return None
    t0 = time.time()
    k = min(int(check_n), int(n_test))
    params = renderer.design_params(int(n_test), seed, ring=ring).subset(np.arange(k))
    cmp = renderer.compare_backends(params, reference)
    ok = ~cmp["failed"]
    noise = 0.0
    if renderer.noise is not None:
        noise = renderer.noise.sample(np.random.default_rng([int(np.sum(seed)), 4099]), k,
                                      (renderer.stamp_size, renderer.stamp_size))
    fast = (cmp["stamps"] + noise).astype(np.float32)[ok]
    ref = (cmp["reference"] + noise).astype(np.float32)[ok]
    res = cmp["residual_over_peak"][ok]
    out = {"backend": renderer.backend, "reference": reference, "n": k, "n_failed": int((~ok).sum()),
           "residual_over_peak": {"median": _q(res, 50), "p99": _q(res, 99), "max": _q(res, 100)},
           "flux_ratio_median": _q(cmp["flux_ratio"][ok], 50), "cnn": {}}
    for name, est in cnns.items():
        if ok.sum() == 0:
            break
        d = est.predict(fast, symmetrize=True, batch_size=batch_size) - est.predict(ref, symmetrize=True,
                                                                                   batch_size=batch_size)
        out["cnn"][f"{name}_sym"] = {"dg_mean": d.mean(axis=0).tolist(), "dg_rms": np.sqrt((d ** 2).mean(axis=0)).tolist()}
    out["seconds"] = time.time() - t0
    log.info("backend check (%s vs %s, %d noiseless test stamps): max |residual|/peak median %.1e, max %.1e; %s",
             out["backend"], reference, k, out["residual_over_peak"]["median"], out["residual_over_peak"]["max"],
             "; ".join(f"{n}: shear difference mean ({c['dg_mean'][0]:+.1e}, {c['dg_mean'][1]:+.1e}) rms "
                       f"({c['dg_rms'][0]:.1e}, {c['dg_rms'][1]:.1e})" for n, c in out["cnn"].items()))
    return out


def _q(x, q) -> float:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if len(x) else float("nan")
