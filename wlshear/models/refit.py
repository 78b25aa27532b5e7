"""Least-squares refit of a trained network's linear head, corrected for regression attenuation.

Springer et al. (2018), Appendix B: freeze the network, compute its penultimate features ``f`` on
un-augmented (rotation and mirror only) simulated stamps with known shears ``g``, and solve the
ordinary least-squares problem ``[f, 1] W = g`` per component. A least-squares predictor of a noisy
target is attenuated: with mean squared residual ``L`` (per component), its response to the true
shear is ``1 + m`` with ``m = -L / Var(g)``. Dividing the refit weights and bias by ``1 + m`` gives a
(multiplicatively) unbiased estimator. For g drawn from U(-g_max, g_max), Var(g) = g_max^2 / 3
(g_max = 0.2 in the paper).

Why: ``g = g_hat + r`` with the residual ``r`` orthogonal to ``g_hat`` and to the constant, so
``Cov(g_hat, g) = Var(g_hat) = Var(g) - L`` and the slope of ``g_hat`` on ``g`` is ``1 - L / Var(g)``.

Symmetric refit (``symmetric=True``, the default of ``train.py``): the estimator is used with the
8-fold symmetry average ``g_sym(x) = (1/8) sum_T s_T (W f(T x) + b)`` (``wlshear.models.symmetry``),
which is linear in the head. Component j reads the symmetrised features
``F_j(x) = (1/8) sum_T s_Tj f(T x)``, and the bias drops out (``sum_T s_Tj = 0``): the refit solves
``F_j w_j = g_j`` with no intercept, so the symmetric estimator's additive term is zero by
construction and it stays exactly equivariant. The same attenuation argument holds without the
intercept, with ``Var(g)`` the (zero-mean) prior's second moment. The bias, which only the
non-averaged prediction sees, is set to the mean residual of ``W f(x)`` on the same stamps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from wlshear.models.normalize import normalize_stamps
from wlshear.models.symmetry import N_SYMMETRIES, shear_sign
from wlshear.models.symmetry import apply as apply_symmetry

__all__ = ["fit_head_lstsq", "fit_head_lstsq_symmetric", "compute_features", "refit_head", "head_features",
           "refit_sample_size"]

# ``refit.n: auto`` = this many stamps per least-squares parameter (d + 1 per shear component): the
# residuals that set the attenuation correction then keep at least as many degrees of freedom as the fit.
AUTO_PER_PARAMETER = 2


def fit_head_lstsq(
    features: np.ndarray | torch.Tensor,
    shears: np.ndarray | torch.Tensor,
    shear_max: float = 0.2,
    var_g: float | None = None,
    rcond: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Solve ``[F, 1] W = G`` by least squares (float64) and correct for attenuation.

    Args:
        features: ``(N, d)`` network features.
        shears: ``(N, 2)`` true (g1, g2).
        shear_max: half-width of the uniform shear distribution, sets ``Var(g) = shear_max^2 / 3``.
        var_g: explicit shear variance overriding ``shear_max`` (e.g. for a non-uniform prior).
        rcond: cut-off for small singular values passed to ``numpy.linalg.lstsq``.

    Returns:
        ``weight (2, d)`` and ``bias (2,)`` float64 tensors for an ``nn.Linear(d, 2)`` head, already
        divided by ``1 + m``; and diagnostics: ``L`` (mean squared residual per component), ``m``
        (``-L / Var(g)``), ``var_g`` used, ``var_g_empirical``, ``rank`` of ``[F, 1]``, ``n``, ``d``,
        ``weight_uncorrected``, ``bias_uncorrected`` (numpy arrays).
    """
    F = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    G = np.asarray(shears.detach().cpu() if isinstance(shears, torch.Tensor) else shears, dtype=np.float64)
    if F.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {F.shape}")
    if G.shape != (F.shape[0], 2):
        raise ValueError(f"shears must be (N, 2) with N = {F.shape[0]} (as features), got shape {G.shape}")
    n, d = F.shape
    if n <= d + 1:
        raise ValueError(f"need more samples than parameters for the refit: N = {n}, d + 1 = {d + 1}")
    good = np.isfinite(F).all(axis=1) & np.isfinite(G).all(axis=1)
    n_bad = int((~good).sum())
    if n_bad == n:
        raise ValueError("all feature/shear rows are non-finite; cannot refit")
    F, G = F[good], G[good]
    var_g = _var_g(shear_max, var_g)

    A = np.concatenate([F, np.ones((F.shape[0], 1))], axis=1)
    W, _, rank, _ = np.linalg.lstsq(A, G, rcond=rcond)  # (d + 1, 2)
    resid = G - A @ W
    L = np.mean(resid**2, axis=0)  # (2,)
    m = -L / var_g
    if np.any(1.0 + m <= 0):
        raise ValueError(
            f"attenuation correction undefined: 1 + m = {1 + m} <= 0 (L = {L}, Var(g) = {var_g}); "
            "the features carry no shear information or shear_max/var_g is wrong"
        )
    W_corr = W / (1.0 + m)  # scales each output column (component) by its own factor
    weight = torch.from_numpy(np.ascontiguousarray(W_corr[:d].T))
    bias = torch.from_numpy(np.ascontiguousarray(W_corr[d]))
    diagnostics = {
        "L": L,
        "m": m,
        "var_g": var_g,
        "var_g_empirical": G.var(axis=0),
        "rank": int(rank),
        "n": int(F.shape[0]),
        "n_nonfinite_dropped": n_bad,
        "d": int(d),
        "weight_uncorrected": W[:d].T.copy(),
        "bias_uncorrected": W[d].copy(),
    }
    return weight, bias, diagnostics


def _var_g(shear_max: float, var_g: float | None) -> float:
    if var_g is None:
        if shear_max <= 0:
            raise ValueError(f"shear_max must be > 0, got {shear_max}")
        var_g = float(shear_max) ** 2 / 3.0
    if float(var_g) <= 0:
        raise ValueError(f"var_g must be > 0, got {var_g}")
    return float(var_g)


def fit_head_lstsq_symmetric(
    sym_features: np.ndarray,
    features: np.ndarray,
    shears: np.ndarray,
    shear_max: float = 0.2,
    var_g: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The head of the symmetry-averaged estimator: per component j solve ``F_j w_j = g_j`` by
    least squares without intercept (module docstring), correct for attenuation, and set the
    bias to the mean residual of the plain features.

    Args:
        sym_features: ``(N, 2, d)`` symmetrised features ``F_j`` per component.
        features: ``(N, d)`` plain features ``f(x)`` (identity element), for the bias.
        shears: ``(N, 2)`` true (g1, g2).

    Returns ``weight (2, d)``, ``bias (2,)`` (float64 tensors, divided by ``1 + m``) and the
    diagnostics of :func:`fit_head_lstsq` plus ``symmetric: True``.
    """
    Fs = np.asarray(sym_features, dtype=np.float64)
    F = np.asarray(features, dtype=np.float64)
    G = np.asarray(shears, dtype=np.float64)
    if Fs.ndim != 3 or Fs.shape[1] != 2 or F.shape != (Fs.shape[0], Fs.shape[2]) or G.shape != (Fs.shape[0], 2):
        raise ValueError(f"need sym_features (N, 2, d), features (N, d), shears (N, 2); got {Fs.shape}, {F.shape}, "
                         f"{G.shape}")
    n, _, d = Fs.shape
    if n <= d:
        raise ValueError(f"need more samples than parameters for the refit: N = {n}, d = {d}")
    good = np.isfinite(Fs).all(axis=(1, 2)) & np.isfinite(F).all(axis=1) & np.isfinite(G).all(axis=1)
    n_bad = int((~good).sum())
    if n_bad == n:
        raise ValueError("all feature/shear rows are non-finite; cannot refit")
    Fs, F, G = Fs[good], F[good], G[good]
    var_g = _var_g(shear_max, var_g)
    W = np.zeros((2, d))
    L = np.zeros(2)
    ranks = []
    for j in range(2):
        W[j], _, rank, _ = np.linalg.lstsq(Fs[:, j], G[:, j], rcond=None)
        L[j] = np.mean((G[:, j] - Fs[:, j] @ W[j]) ** 2)
        ranks.append(int(rank))
    m = -L / var_g
    if np.any(1.0 + m <= 0):
        raise ValueError(f"attenuation correction undefined: 1 + m = {1 + m} <= 0 (L = {L}, Var(g) = {var_g}); "
                         "the features carry no shear information or shear_max/var_g is wrong")
    b = np.mean(G - F @ W.T, axis=0)
    weight = torch.from_numpy(np.ascontiguousarray(W / (1.0 + m)[:, None]))
    bias = torch.from_numpy(np.ascontiguousarray(b / (1.0 + m)))
    diagnostics = {"L": L, "m": m, "var_g": var_g, "var_g_empirical": G.var(axis=0), "rank": min(ranks),
                   "n": int(Fs.shape[0]), "n_nonfinite_dropped": n_bad, "d": int(d), "symmetric": True,
                   "weight_uncorrected": W.copy(), "bias_uncorrected": b}
    return weight, bias, diagnostics


def _split_net(model: nn.Module) -> nn.Module:
    """The bare network of ``model`` (a net with ``features``/``head``, or a wrapper with ``.net``)."""
    net = getattr(model, "net", model)
    if not (hasattr(net, "features") and isinstance(getattr(net, "head", None), nn.Linear)):
        raise ValueError(
            f"{type(model).__name__} has no `features(x)` method and `head` nn.Linear "
            "(nor a `.net` attribute that has them); cannot refit its head"
        )
    return net


def head_features(model: nn.Module) -> int:
    """Number ``d`` of penultimate features that the linear head of ``model`` (or ``model.net``) reads."""
    return int(_split_net(model).head.in_features)


def refit_sample_size(model: nn.Module, n: int | str) -> int:
    """Stamps for the head refit of ``model``: ``n``, or for ``n = "auto"`` ``AUTO_PER_PARAMETER x (d + 1)``
    with ``d`` the head's input features (30 for PaperCNN, 64 for WideCNN and ResNetSmall), so that the
    size follows the architecture.

    Raises ``ValueError`` (naming ``refit.n`` and the minimum) when ``n`` cannot determine the
    ``d + 1`` least-squares parameters per component, i.e. ``n <= d + 1``: call it before training, so
    a run does not train for hours and then fail at the refit.
    """
    d = head_features(model)
    if isinstance(n, str) and n.strip().lower() == "auto":
        return AUTO_PER_PARAMETER * (d + 1)
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise ValueError(f"refit.n must be a number of stamps or 'auto', got {n!r}") from None
    if n <= d + 1:
        raise ValueError(
            f"refit.n={n} is too small for the head refit of {type(_split_net(model)).__name__}: it has d = {d} "
            f"features, so the least-squares fit has d + 1 = {d + 1} parameters per component and needs "
            f"refit.n >= {d + 2} (better >= {AUTO_PER_PARAMETER * (d + 1)}, what refit.n=auto gives; "
            "the paper uses 300,000). Or switch the refit off with refit.enabled=false."
        )
    return n


@torch.no_grad()
def compute_features(
    model: nn.Module,
    batches: Iterable,
    normalize: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    symmetric: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Penultimate features and true shears for every batch, in eval mode without gradients.

    With ``symmetric=True`` returns ``(sym_features (N, 2, d), features (N, d), shears (N, 2))``:
    the per-component symmetrised features ``(1/8) sum_T s_Tj f(T x)`` of the 8-fold average
    (module docstring) besides the plain ones.

    Args:
        model: a network with ``features``/``head`` or a wrapper (``ShearRegressor``) with ``.net``.
        batches: iterable of ``(x, y)`` or ``(x, y, meta)``; ``x`` raw stamps ``(B, H, W)`` or
            ``(B, 1, H, W)`` in counts, ``y`` true shears ``(B, 2)``.
        normalize: apply per-stamp normalisation (set False if ``x`` is already normalised).
        device: where to run; defaults to the model's device.
        progress: show a tqdm progress bar.

    Returns:
        ``features (N, d)`` and ``shears (N, 2)`` as float64 numpy arrays.
    """
    net = _split_net(model)
    if device is None:
        device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    dtype = next(net.parameters()).dtype
    feats, targets, sym_feats = [], [], []
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="refit features", disable=not progress):
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ValueError("each batch must be (x, y) or (x, y, meta) with y the true shears (B, 2)")
            x, y = batch[0], batch[1]
            x = torch.as_tensor(x).to(device=device, dtype=dtype)
            if x.ndim == 3:
                x = x.unsqueeze(1)
            if normalize:
                x = normalize_stamps(x)
            if symmetric:
                f0 = net.features(x).double()
                sym = torch.zeros((x.shape[0], 2, f0.shape[1]), dtype=torch.float64, device=f0.device)
                for k in range(N_SYMMETRIES):
                    fk = f0 if k == 0 else net.features(apply_symmetry(x, k).contiguous()).double()
                    s1, s2 = shear_sign(k)
                    sym[:, 0] += s1 * fk
                    sym[:, 1] += s2 * fk
                sym_feats.append((sym / N_SYMMETRIES).cpu().numpy())
                feats.append(f0.cpu().numpy())
            else:
                feats.append(net.features(x).double().cpu().numpy())
            targets.append(torch.as_tensor(y).double().cpu().numpy().reshape(-1, 2))
    finally:
        net.train(was_training)
    if not feats:
        raise ValueError("no batches were given for the head refit")
    if symmetric:
        return np.concatenate(sym_feats), np.concatenate(feats), np.concatenate(targets)
    return np.concatenate(feats), np.concatenate(targets)


def _detached_deepcopy(model: nn.Module) -> nn.Module:
    """Deep copy that does not drag along an attached Lightning ``Trainer`` (if any)."""
    trainer = getattr(model, "_trainer", None)
    if trainer is None:
        return copy.deepcopy(model)
    model._trainer = None
    try:
        return copy.deepcopy(model)
    finally:
        model._trainer = trainer


def refit_head(
    model: nn.Module,
    batches: Iterable,
    shear_max: float = 0.2,
    var_g: float | None = None,
    normalize: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    symmetric: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Return a deep copy of ``model`` whose linear head is the attenuation-corrected LS refit.

    ``symmetric``: refit the head of the 8-fold symmetry-averaged estimator
    (:func:`fit_head_lstsq_symmetric`: no intercept, additive term zero by construction).

    The input model is not modified. ``model`` may be a bare network (``features`` + ``head``) or a
    wrapper with a ``.net`` attribute (e.g. ``ShearRegressor``); the copy has the same type.
    See :func:`compute_features` for ``batches`` and :func:`fit_head_lstsq` for the diagnostics.
    """
    if symmetric:
        Fs, F, G = compute_features(model, batches, normalize=normalize, device=device, progress=progress,
                                    symmetric=True)
        weight, bias, diagnostics = fit_head_lstsq_symmetric(Fs, F, G, shear_max=shear_max, var_g=var_g)
    else:
        F, G = compute_features(model, batches, normalize=normalize, device=device, progress=progress)
        weight, bias, diagnostics = fit_head_lstsq(F, G, shear_max=shear_max, var_g=var_g)
    new_model = _detached_deepcopy(model)
    head = _split_net(new_model).head
    if head.weight.shape != weight.shape:
        raise ValueError(f"refit weight shape {tuple(weight.shape)} != head weight {tuple(head.weight.shape)}")
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))
    return new_model, diagnostics
