"""Per-stamp random parameters: shear and augmentations.

A ``StampParams`` holds, for N stamps, everything that decides a noiseless stamp: galaxy id,
shear (g1, g2), rotation angle [rad], mirror flag, magnification mu and centroid shift (dx, dy)
[pixels]. Drawing the parameters is separate from rendering them, so that every rendering
backend (GalSim, the batched torch renderer) renders the very same galaxies for the same seed.

Order of operations applied to the intrinsic galaxy: mirror (x -> -x), rotate by ``rotation``
(counter-clockwise), lens by (g1, g2, mu), convolve with the PSF, shift by (dx, dy).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

from wlshear.sim.constants import SHEAR_MAX


@dataclass(frozen=True)
class Augmentation:
    """Augmentation settings (all switchable; ranges configurable).

    rotation : uniform rotation angle in [0, 2 pi) when True, else 0.
    mirror : mirror x -> -x with probability ``mirror_prob`` when True.
    magnification : (lo, hi) for a uniform mu, or None for mu = 1.
    shift : maximum |dx|, |dy| [pixels] of a uniform centroid shift (0 for none).
    shear_max : g1, g2 ~ U(-shear_max, shear_max) independently (``shear_prior="uniform"``), or the
        truncation |g_i| < shear_max of the Gaussian prior.
    shear_prior : "uniform" (the paper's) or "gaussian": g1, g2 ~ N(0, shear_sigma^2) independently,
        redrawn where |g_i| >= shear_max. An MSE regressor returns the posterior mean of the shear,
        which a bounded uniform prior bends (its ensemble response falls with |g|); under a Gaussian
        prior and a Gaussian likelihood the posterior mean would be linear in the data. Measured on
        the paper CNN it only lessens the fall (conf/experiment/structured_d4_gauss.yaml).
    shear_sigma : per-component standard deviation of the Gaussian prior (dimensionless shear).
    """

    rotation: bool = True
    mirror: bool = True
    mirror_prob: float = 0.5
    magnification: tuple[float, float] | None = (0.925, 1.075)
    shift: float = 3.5
    shear_max: float = SHEAR_MAX
    shear_prior: str = "uniform"
    shear_sigma: float = 0.12

    def __post_init__(self):
        if self.magnification is not None:
            lo, hi = self.magnification
            object.__setattr__(self, "magnification", (float(lo), float(hi)))
            if not 0 < lo <= hi:
                raise ValueError(f"magnification range must satisfy 0 < lo <= hi, got {self.magnification}")
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0 pixels, got {self.shift}")
        if not 0 <= self.shear_max < 1:
            raise ValueError(f"shear_max must be in [0, 1), got {self.shear_max}")
        if self.shear_prior not in SHEAR_PRIORS:
            raise ValueError(f"shear_prior must be one of {SHEAR_PRIORS}, got {self.shear_prior!r}")
        if self.shear_prior == "gaussian" and not 0 < self.shear_sigma:
            raise ValueError(f"shear_sigma must be > 0 for the Gaussian shear prior, got {self.shear_sigma}")

    def sample_shear(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` shears (g1, g2) from the prior (see the class docstring)."""
        return _sample_component(rng, n, self), _sample_component(rng, n, self)

    @property
    def shear_var(self) -> float:
        """Per-component variance Var(g_i) of the shear prior (sets the head refit's attenuation)."""
        return shear_variance(self.shear_prior, self.shear_max, self.shear_sigma)

    def test_mode(self) -> "Augmentation":
        """Rotation and mirror only (the paper's test and head-refit sets)."""
        return replace(self, rotation=True, mirror=True, magnification=None, shift=0.0)


SHEAR_PRIORS = ("uniform", "gaussian")


def shear_variance(prior: str, shear_max: float, shear_sigma: float = 0.12) -> float:
    """Per-component variance of the shear prior: shear_max^2 / 3 for the uniform one; for the
    Gaussian truncated at |g_i| < shear_max, sigma^2 [1 - 2 b phi(b) / (2 Phi(b) - 1)], b = shear_max / sigma."""
    if prior == "uniform":
        return float(shear_max) ** 2 / 3.0
    if prior == "gaussian":
        from math import erf, exp, pi, sqrt

        b = float(shear_max) / float(shear_sigma)
        phi = exp(-0.5 * b * b) / sqrt(2 * pi)
        mass = erf(b / sqrt(2))  # 2 Phi(b) - 1
        return float(shear_sigma) ** 2 * (1 - 2 * b * phi / mass)
    raise ValueError(f"shear_prior must be one of {SHEAR_PRIORS}, got {prior!r}")


def _sample_component(rng: np.random.Generator, n: int, aug: "Augmentation") -> np.ndarray:
    s = aug.shear_max
    if aug.shear_prior == "uniform":
        return rng.uniform(-s, s, n)
    g = rng.normal(0.0, aug.shear_sigma, n)
    bad = np.abs(g) >= s
    while bad.any():  # rejection: the truncation keeps the prior inside the renderers' |g| bound
        g[bad] = rng.normal(0.0, aug.shear_sigma, int(bad.sum()))
        bad = np.abs(g) >= s
    return g


@dataclass
class StampParams:
    """Vectorised parameters of N stamps (see module docstring for the order of operations)."""

    galaxy_id: np.ndarray
    g1: np.ndarray
    g2: np.ndarray
    rotation: np.ndarray
    mirror: np.ndarray
    mu: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    pair_id: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.pair_id is None:
            self.pair_id = np.arange(len(self.galaxy_id))

    def __len__(self) -> int:
        return len(self.galaxy_id)

    def subset(self, idx) -> "StampParams":
        return StampParams(**{f.name: np.asarray(getattr(self, f.name))[idx] for f in fields(self)})

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def concat(cls, parts) -> "StampParams":
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def sample_params(rng: np.random.Generator, n: int, weights: np.ndarray, aug: Augmentation,
                  ring: bool = False) -> StampParams:
    """Draw parameters of ``n`` stamps.

    ``weights`` are the galaxy draw probabilities (population). With ``ring=True`` the stamps come
    in shape-noise-cancelling pairs: each galaxy is drawn twice with the same shear, shift and
    magnification, the second copy rotated by an extra 90 degrees (``n`` must be even); pairs
    share ``pair_id``.
    """
    if ring and n % 2:
        raise ValueError("ring pairs need an even number of stamps")
    m = n // 2 if ring else n
    gid = rng.choice(len(weights), size=m, p=weights)
    g1, g2 = aug.sample_shear(rng, m)
    rot = rng.uniform(0, 2 * np.pi, m) if aug.rotation else np.zeros(m)
    mir = (rng.random(m) < aug.mirror_prob) if aug.mirror else np.zeros(m, bool)
    mu = rng.uniform(*aug.magnification, m) if aug.magnification is not None else np.ones(m)
    if aug.shift > 0:
        dx = rng.uniform(-aug.shift, aug.shift, m)
        dy = rng.uniform(-aug.shift, aug.shift, m)
    else:
        dx = np.zeros(m)
        dy = np.zeros(m)
    p = StampParams(gid, g1, g2, rot, mir, mu, dx, dy, np.arange(m))
    if ring:
        q = p.subset(slice(None))
        q.rotation = (q.rotation + np.pi / 2) % (2 * np.pi)
        p = StampParams.concat([p, q])
    return p


def shear_pair_params(galaxy_ids, n_orient: int, shear: float, rng: np.random.Generator,
                      mirror: bool = True) -> tuple[StampParams, np.ndarray, dict[str, np.ndarray]]:
    """The +-g common-noise design with 90-degree ring twins, for shear-bias measurements.

    For each galaxy id and each of ``n_orient`` random orientations (rotation U[0, 2 pi), mirror
    with p = 0.5 when ``mirror``), the galaxy is drawn at that orientation and at +90 degrees (ring
    twin), each under four shears: (+shear, 0), (-shear, 0), (0, +shear), (0, -shear). The two
    stamps of opposite shear share one noise realisation, so noise cancels in their difference.
    No magnification, no centroid shift.

    Returns ``(params, noise_groups, design)``: ``noise_groups`` for ``StampRenderer.render``;
    ``design`` holds ``unit`` (galaxy x orientation index, the independent unit for errors),
    ``component`` (0 or 1: which shear component is non-zero), ``sign`` (+1 / -1) and
    ``noise_group`` (the pair sharing a noise realisation; give it to ``metacal`` so that the pair
    also shares its fixnoise field) per stamp.
    ``pair_id`` of the params is the unit index.
    """
    if n_orient < 1:
        raise ValueError(f"n_orient must be >= 1, got {n_orient}")
    if not 0 < shear < 1:
        raise ValueError(f"shear must be in (0, 1), got {shear}")
    gid = np.repeat(np.asarray(galaxy_ids, dtype=np.int64), n_orient)
    n_units = len(gid)
    rot = rng.uniform(0, 2 * np.pi, n_units)
    mir = (rng.random(n_units) < 0.5) if mirror else np.zeros(n_units, bool)
    # per unit: 2 ring twins x 2 components x 2 signs = 8 stamps
    twin = np.tile(np.repeat([0, 1], 4), n_units)
    comp = np.tile(np.repeat([0, 1, 0, 1], 2), n_units)
    sign = np.tile([1, -1], 4 * n_units)
    unit = np.repeat(np.arange(n_units), 8)
    g = np.zeros((8 * n_units, 2))
    g[np.arange(8 * n_units), comp] = sign * shear
    rotation = (rot[unit] + twin * np.pi / 2) % (2 * np.pi)
    zeros = np.zeros(8 * n_units)
    params = StampParams(gid[unit], g[:, 0], g[:, 1], rotation, mir[unit], np.ones(8 * n_units),
                         zeros, zeros.copy(), unit)
    noise_groups = np.arange(8 * n_units) // 2  # the (+, -) stamps of one twin and component
    return params, noise_groups, {"unit": unit, "component": comp, "sign": sign, "noise_group": noise_groups}
