"""Lightning module that trains a shear-regression CNN with an MSE loss.

Hydra usage (Lightning-Hydra-template style)::

    model:
      _target_: wlshear.models.ShearRegressor
      net: {_target_: wlshear.models.PaperCNN, dropout: 0.3}
      optimizer: {_target_: torch.optim.RMSprop, _partial_: true, lr: 3.0e-4, alpha: 0.9, eps: 1.0e-8}
      scheduler: {_target_: torch.optim.lr_scheduler.ReduceLROnPlateau, _partial_: true,
                  mode: min, factor: 0.31622776, patience: 10, min_lr: 2.0e-6}
      scheduler_monitor: val/loss
      symmetrize_eval: false
      shear_max: 0.2

Batches are ``(x, y)`` or ``(x, y, meta)``: ``x`` raw stamps in counts, float32 ``(B, 32, 32)`` or
``(B, 1, 32, 32)`` (normalised per stamp here), ``y`` the true shears ``(B, 2)``.

Logged (slash names, see docs/CONVENTIONS.md): ``train/loss``; ``val/loss``, ``val/rmse_g1``,
``val/rmse_g2`` (RMS of raw prediction - truth), ``val/m1``, ``val/m2``, ``val/c1``, ``val/c2`` (per-epoch
least-squares line ``g_pred = (1 + m) g_true + c`` over the whole validation set, gathered across
processes), ``val/sigma1``, ``val/sigma2`` (RMS of the calibrated ``(g_pred - c)/(1 + m) - g_true``);
the same under ``test/``.

Checkpoints: ``save_hyperparameters`` ignores ``net``, ``optimizer`` and ``scheduler`` (nn.Module /
functools.partial objects). Keeping them out makes the checkpoint loadable with
``torch.load(weights_only=True)`` (torch's default), so resuming and :func:`load_estimator` work
without unpickling arbitrary objects. The network's class path and constructor kwargs are stored in
``hparams["net_spec"]`` and string descriptions in ``hparams["optimizer_desc"]`` /
``hparams["scheduler_desc"]``; ``ShearRegressor.load_from_checkpoint(path, net=...)`` works
(unknown hparams are filtered out by Lightning), as does :func:`wlshear.models.load_estimator`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from wlshear.models.architectures import net_spec
from wlshear.models.normalize import normalize_stamps
from wlshear.models.objectives import MSEObjective
from wlshear.models import symmetry as _symmetry

__all__ = ["ShearRegressor", "linear_bias_fit", "default_optimizer"]


def default_optimizer(params) -> torch.optim.Optimizer:
    """The paper's optimiser: RMSprop, lr 3e-4, smoothing 0.9, eps 1e-8."""
    return torch.optim.RMSprop(params, lr=3e-4, alpha=0.9, eps=1e-8)


def linear_bias_fit(pred: torch.Tensor, true: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-component least-squares line ``pred = (1 + m) true + c`` and RMS errors (float64).

    Returns tensors of shape ``(2,)``: ``m``, ``c``, ``rmse`` (raw pred - true) and ``sigma``
    (RMS of the calibrated ``(pred - c) / (1 + m) - true``). Undefined values (fewer than 2 rows or
    zero truth variance) are NaN.
    """
    pred = pred.double()
    true = true.double()
    mean_t, mean_p = true.mean(0), pred.mean(0)
    dt, dp = true - mean_t, pred - mean_p
    var_t = (dt * dt).mean(0)
    slope = (dt * dp).mean(0) / var_t  # NaN/inf when var_t == 0
    slope = torch.where(var_t > 0, slope, torch.full_like(slope, float("nan")))
    c = mean_p - slope * mean_t
    rmse = (pred - true).square().mean(0).sqrt()
    sigma = ((pred - c) / slope - true).square().mean(0).sqrt()
    return {"m": slope - 1.0, "c": c, "rmse": rmse, "sigma": sigma}


def _describe(obj: Any) -> str | None:
    if obj is None:
        return None
    func = getattr(obj, "func", None)  # functools.partial
    if func is not None:
        name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
        kw = ", ".join(f"{k}={v!r}" for k, v in sorted(getattr(obj, "keywords", {}).items()))
        return f"{name}({kw})"
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"


class ShearRegressor(L.LightningModule):
    """Train ``net`` to regress (g1, g2) from raw stamps with an MSE loss.

    Args:
        net: network with the ``features``/``head`` interface of :mod:`wlshear.models.architectures`.
        optimizer: callable ``params -> Optimizer`` (e.g. a Hydra ``_partial_: true`` object);
            ``None`` uses the paper's RMSprop (lr 3e-4, alpha 0.9, eps 1e-8).
        scheduler: callable ``optimizer -> LR scheduler`` or ``None``.
        scheduler_monitor: metric a ReduceLROnPlateau-type scheduler watches.
        symmetrize_eval: average predictions over the 8 square symmetries in val/test/predict.
        symmetrize_train: train the 8-fold average itself (the loss sees ``(1/8) sum_T s_T net(T x)``,
            an exactly equivariant estimator at every step; 8x the compute per stamp).
        shear_max: half-width of the training shear distribution (recorded; used by the head refit).
        objective: training loss, a callable ``(pred, true, groups) -> (loss, parts)`` of
            :mod:`wlshear.models.objectives` (chosen in the model config by ``_target_``): ``None`` =
            :class:`~wlshear.models.objectives.MSEObjective` (the paper's loss), or e.g.
            ``ConditionalBiasLoss(slope_weight=...)`` (MSE + per-galaxy response penalty; needs
            grouped batches, ``GroupedShearStream``). Validation/test losses are always plain MSE.
        init_from: optional estimator file / Lightning checkpoint whose network weights initialise
            ``net`` (fine-tuning). Not saved in the hparams as a path to load again (a checkpoint
            restores its own weights); recorded as ``hparams["init_from_desc"]``.
        input_transform: optional :class:`wlshear.sim.metacal.MetacalOperator`: every batch (train,
            validation, test, predict) is mapped to its no-shear metacal counterfactual (with
            fixnoise) before normalisation, so the network learns the images it sees under
            metacalibration. Its settings are saved as ``hparams["metacal_settings"]``.

    Grouped batches: ``y`` of shape ``(B, K, 2)`` with ``x`` ``(B, K, H, W)`` hold B groups of K
    stamps of one galaxy each; they are flattened to ``B * K`` stamps with group ids for the objective.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_monitor: str = "val/loss",
        symmetrize_eval: bool = False,
        symmetrize_train: bool = False,
        shear_max: float = 0.2,
        objective: Any = None,
        init_from: str | None = None,
        input_transform: Any = None,
    ) -> None:
        super().__init__()
        if objective is None:
            objective = MSEObjective()
        if not callable(objective):
            raise ValueError(f"objective must be a callable (pred, true, groups) -> (loss, parts) such as "
                             f"wlshear.models.objectives.ConditionalBiasLoss(...), got {objective!r}")
        # the objective is recorded as objective_desc (an object would not load with weights_only=True)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "init_from", "input_transform", "objective"],
                                  logger=False)
        self.objective = objective
        if init_from:
            from wlshear.models.estimator import load_estimator

            src = load_estimator(init_from)
            try:
                net.load_state_dict(src.net.state_dict())
            except RuntimeError as exc:
                raise ValueError(f"init_from={init_from}: its network does not match this model's net: {exc}") from exc
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        try:
            self.hparams["net_spec"] = net_spec(net)
        except ValueError:
            self.hparams["net_spec"] = None  # custom net without init_kwargs: rebuild by hand
        self.hparams["optimizer_desc"] = _describe(optimizer)
        self.hparams["scheduler_desc"] = _describe(scheduler)
        self.hparams["objective_desc"] = repr(self.objective)
        self.hparams["init_from_desc"] = None if not init_from else str(init_from)
        self.input_transform = input_transform
        self.hparams["metacal_settings"] = None if input_transform is None else input_transform.to_dict()
        self._eval_outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    # ------------------------------------------------------------------ inference helpers
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"stamps must be (B, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=self.dtype)
        if self.input_transform is not None:
            x = self.input_transform.noshear(x)
        return normalize_stamps(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shear ``(B, 2)`` for raw stamps ``(B, H, W)`` / ``(B, 1, H, W)`` (no symmetry average)."""
        return self.net(self._prepare(x))

    def predict_shear(self, x: torch.Tensor, symmetrize: bool | None = None) -> torch.Tensor:
        """Shear ``(B, 2)`` for raw stamps, symmetry-averaged if requested (default: ``symmetrize_eval``)."""
        use_sym = self.hparams.symmetrize_eval if symmetrize is None else symmetrize
        xn = self._prepare(x)
        return _symmetry.symmetrize(self.net, xn) if use_sym else self.net(xn)

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            return batch, None
        if isinstance(batch, (list, tuple)) and len(batch) >= 1:
            return batch[0], (batch[1] if len(batch) >= 2 else None)
        if isinstance(batch, dict) and "x" in batch:
            return batch["x"], batch.get("y")
        raise ValueError("a batch must be x, (x,), (x, y) or (x, y, meta)")

    def _xy(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._unpack(batch)
        if y is None:
            raise ValueError("training/validation/test batches need true shears: (x, y) or (x, y, meta)")
        y = torch.as_tensor(y).to(device=self.device, dtype=self.dtype)
        if y.ndim != 2 or y.shape[1] != 2:
            raise ValueError(f"true shears must be (B, 2), got shape {tuple(y.shape)}")
        return x, y

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._unpack(batch)
        groups = None
        if y is not None and torch.as_tensor(y).ndim == 3:  # (B, K, 2): B groups of K stamps
            y = torch.as_tensor(y)
            b, k = y.shape[0], y.shape[1]
            x = torch.as_tensor(x).reshape(b * k, *torch.as_tensor(x).shape[-2:])
            y = y.reshape(b * k, 2)
            groups = torch.arange(b, device=self.device).repeat_interleave(k)
            batch = (x, y)
        x, y = self._xy(batch)
        pred = self.predict_shear(x, symmetrize=True) if self.hparams.get("symmetrize_train") else self(x)
        loss, parts = self.objective(pred, y, groups)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        for name, val in parts.items():
            if name != "mse" or len(parts) > 1:
                self.log(f"train/{name}", val, on_step=True, on_epoch=True, batch_size=y.shape[0])
        return loss

    def _eval_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = self._xy(batch)
        pred = self.predict_shear(x)
        loss = F.mse_loss(pred, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 sync_dist=True, batch_size=y.shape[0])
        self._eval_outputs[stage].append((pred.detach(), y.detach()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x, _ = self._unpack(batch)
        return self.predict_shear(x)

    # ------------------------------------------------------------------ epoch-level metrics
    def _gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``(n_rank, k)`` tensors of all processes (ranks may hold different n)."""
        if self.trainer is None or self.trainer.world_size <= 1:
            return t
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = self.all_gather(n).reshape(-1)
        n_max = int(sizes.max())
        padded = t.new_zeros((n_max, *t.shape[1:]))
        padded[: t.shape[0]] = t
        gathered = self.all_gather(padded)  # (world, n_max, k)
        return torch.cat([gathered[r, : int(sizes[r])] for r in range(gathered.shape[0])])

    def _eval_epoch_end(self, stage: str) -> None:
        outputs = self._eval_outputs[stage]
        if outputs:
            pred = torch.cat([p for p, _ in outputs])
            true = torch.cat([t for _, t in outputs])
        else:
            pred = torch.zeros((0, 2), device=self.device, dtype=self.dtype)
            true = torch.zeros((0, 2), device=self.device, dtype=self.dtype)
        outputs.clear()
        both = self._gather_rows(torch.cat([pred, true], dim=1))
        if both.shape[0] < 2:
            return
        fit = linear_bias_fit(both[:, :2], both[:, 2:])
        # identical on every rank after the gather, so no further reduction is needed
        for i in (0, 1):
            self.log(f"{stage}/m{i + 1}", fit["m"][i].float())
            self.log(f"{stage}/c{i + 1}", fit["c"][i].float())
            self.log(f"{stage}/rmse_g{i + 1}", fit["rmse"][i].float())
            self.log(f"{stage}/sigma{i + 1}", fit["sigma"][i].float())

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs["val"].clear()

    def on_test_epoch_start(self) -> None:
        self._eval_outputs["test"].clear()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        factory = self.optimizer_factory or default_optimizer
        optimizer = factory(params=self.parameters())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "monitor": self.hparams.scheduler_monitor,
                "interval": "epoch",
                "frequency": 1,
            },
        }
