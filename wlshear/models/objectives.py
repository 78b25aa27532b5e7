"""Training objectives for shear regression: plain MSE and a conditional-bias penalty.

An MSE-trained network is a shrinkage estimator: its response to shear, ``1 + m``, differs from
galaxy to galaxy (faint and small galaxies are shrunk most). A global calibration removes the
population-mean ``m`` only. :class:`ConditionalBiasLoss` adds, for batches made of *groups* (K
stamps of one galaxy: same galaxy, rotation, mirror, magnification and centroid, K different
shears and noise realisations; ``wlshear.data.GroupedShearStream``), a penalty on each galaxy's
response: per group and component, the least-squares slope ``s`` of prediction on true shear
(``s = cov(pred, g) / var(g)`` over the K stamps), and

    loss = MSE + weight * mean_{groups, components} (s - target_slope)^2.

The intercept of a group is the galaxy's intrinsic ellipticity (plus additive bias), so it is not
penalised. With one noise realisation shared by the group (``GroupedShearStream(same_noise=True)``,
the default) the slope is the network's response to that galaxy's shear, with little noise. With
independent noise per member the slope is noisy; its variance ``Var(s) ~ sigma_noise^2 / Sxx``
adds to the expected penalty and rewards shrinking noisy galaxies (the opposite of the aim).
``debias=True`` subtracts the estimated ``Var(s)`` (residual variance / (K - 2) / Sxx), making the
penalty an unbiased estimate of ``(s - target)^2``.

Choosing ``slope_weight``: for a galaxy class with per-galaxy noise variance ``sigma_i^2`` on the
calibrated scale, MSE + w (s - 1)^2 is minimised near ``s_i = (Var(g) + w) / (Var(g) + sigma_i^2 + w)``,
so the response is uniform across classes only when ``w >> sigma_i^2`` (sigma_i ~ 0.25-0.5 at full
CLASH noise: w of a few or more).

Objectives are callables ``objective(pred (N, 2), true (N, 2), groups (N,) long or None) ->
(loss, parts)`` with ``parts`` a dict of detached scalars to log, chosen in the model config by
``_target_`` (``conf/model/paper_cnn_condbias.yaml``); ``ShearRegressor(objective=None)`` is MSE. With ``groups=None`` (ungrouped
batches such as the validation set) the conditional objective reduces to its MSE term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MSEObjective", "ConditionalBiasLoss", "group_slopes"]


class MSEObjective:
    """Plain mean squared error (the paper's loss)."""

    name = "mse"

    def __call__(self, pred: torch.Tensor, true: torch.Tensor, groups: torch.Tensor | None = None):
        loss = F.mse_loss(pred, true)
        return loss, {"mse": loss.detach()}

    def __repr__(self) -> str:
        return "MSEObjective()"


def group_slopes(pred: torch.Tensor, true: torch.Tensor, groups: torch.Tensor):
    """Per-group least-squares slope of ``pred`` on ``true``, per component.

    Returns ``slope (G, 2)``, ``slope_var (G, 2)`` (estimated sampling variance of the slope from
    the group's residuals; needs >= 3 members) and ``valid (G, 2)`` (group has true-shear spread).
    Groups are the distinct values of ``groups`` in sorted order.
    """
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"pred and true must both be (N, k); got {tuple(pred.shape)}, {tuple(true.shape)}")
    n, k = pred.shape
    gmax = int(groups.max()) + 1
    if n % gmax == 0 and torch.equal(groups, torch.arange(gmax, device=groups.device).repeat_interleave(n // gmax)):
        return _slopes_blocked(pred.reshape(gmax, n // gmax, k), true.reshape(gmax, n // gmax, k))
    _, inv = torch.unique(groups, return_inverse=True)
    g = int(inv.max()) + 1
    cnt = torch.zeros(g, dtype=pred.dtype, device=pred.device).index_add_(0, inv, torch.ones_like(pred[:, 0]))

    def gmean(v):
        return torch.zeros(g, k, dtype=v.dtype, device=v.device).index_add_(0, inv, v) / cnt[:, None]

    mt, mp = gmean(true), gmean(pred)
    dt, dp = true - mt[inv], pred - mp[inv]
    sxx = torch.zeros(g, k, dtype=pred.dtype, device=pred.device).index_add_(0, inv, dt * dt)
    sxy = torch.zeros(g, k, dtype=pred.dtype, device=pred.device).index_add_(0, inv, dt * dp)
    valid = sxx > 1e-12
    slope = torch.where(valid, sxy / sxx.clamp_min(1e-12), torch.zeros_like(sxx))
    resid = dp - slope[inv] * dt
    rss = torch.zeros(g, k, dtype=pred.dtype, device=pred.device).index_add_(0, inv, resid * resid)
    dof = (cnt - 2).clamp_min(1)[:, None]
    slope_var = torch.where(valid & (cnt[:, None] > 2), rss / dof / sxx.clamp_min(1e-12), torch.zeros_like(sxx))
    return slope, slope_var, valid


def _slopes_blocked(pred: torch.Tensor, true: torch.Tensor):
    """:func:`group_slopes` for equal-size contiguous groups, ``(G, K, k)`` tensors (fast path)."""
    kk = pred.shape[1]
    dt = true - true.mean(1, keepdim=True)
    dp = pred - pred.mean(1, keepdim=True)
    sxx = (dt * dt).sum(1)
    valid = sxx > 1e-12
    slope = torch.where(valid, (dt * dp).sum(1) / sxx.clamp_min(1e-12), torch.zeros_like(sxx))
    rss = ((dp - slope[:, None, :] * dt) ** 2).sum(1)
    slope_var = torch.where(valid & (kk > 2), rss / max(kk - 2, 1) / sxx.clamp_min(1e-12), torch.zeros_like(sxx))
    return slope, slope_var, valid


class ConditionalBiasLoss:
    """MSE plus a penalty on each galaxy's shear response (see module docstring).

    Args:
        slope_weight: weight of the mean squared deviation of per-group slopes from ``target_slope``.
        target_slope: the response aimed for (1 = unbiased per galaxy).
        mse_weight: weight of the MSE term (keep > 0: it sets the estimator's precision).
        debias: subtract the estimated sampling variance of each slope from its penalty.
    """

    name = "condbias"

    def __init__(self, slope_weight: float = 0.1, target_slope: float = 1.0, mse_weight: float = 1.0,
                 debias: bool = False):
        if slope_weight < 0 or mse_weight < 0:
            raise ValueError(f"weights must be >= 0, got slope_weight={slope_weight}, mse_weight={mse_weight}")
        self.slope_weight = float(slope_weight)
        self.target_slope = float(target_slope)
        self.mse_weight = float(mse_weight)
        self.debias = bool(debias)

    def penalty(self, pred: torch.Tensor, true: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Mean over valid groups and components of ``(slope - target)^2`` (minus Var(slope) if debias)."""
        slope, var, valid = group_slopes(pred, true, groups)
        pen = (slope - self.target_slope) ** 2
        if self.debias:
            pen = pen - var
        n = valid.sum()
        if int(n) == 0:
            return pred.sum() * 0.0
        return torch.where(valid, pen, torch.zeros_like(pen)).sum() / n

    def __call__(self, pred: torch.Tensor, true: torch.Tensor, groups: torch.Tensor | None = None):
        mse = F.mse_loss(pred, true)
        parts = {"mse": mse.detach()}
        loss = self.mse_weight * mse
        if groups is not None and self.slope_weight > 0:
            pen = self.penalty(pred, true, groups)
            loss = loss + self.slope_weight * pen
            parts["slope_penalty"] = pen.detach()
        return loss, parts

    def __repr__(self) -> str:
        return (f"ConditionalBiasLoss(slope_weight={self.slope_weight}, target_slope={self.target_slope}, "
                f"mse_weight={self.mse_weight}, debias={self.debias})")
