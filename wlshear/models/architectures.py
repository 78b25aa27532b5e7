"""CNN architectures that map a per-stamp-normalised galaxy stamp to a shear (g1, g2).

Every network here takes a float tensor ``(B, 1, 32, 32)`` whose axes are (batch, channel, y = row,
x = column) -- the array convention of ``docs/CONVENTIONS.md`` -- already normalised per stamp
(see :mod:`wlshear.models.normalize`), and returns ``(B, 2)`` = (g1, g2), dimensionless.

Common interface (relied on by the head refit, the Lightning module and the estimator):

- ``features(x) -> (B, feature_dim)``: the penultimate representation, i.e. the output of the last
  hidden layer after its ReLU (and after its dropout, which is the identity in ``eval()`` mode);
- ``head``: the final ``nn.Linear(feature_dim, 2)``;
- ``forward(x) == head(features(x))``;
- ``init_kwargs``: the constructor keyword arguments (plain Python types) so that
  :func:`net_spec` / :func:`build_net` can rebuild the network from a saved file.

Constructors take only simple keyword arguments so that ``hydra.utils.instantiate`` can build them
from YAML (lists arrive as OmegaConf ``ListConfig`` and are converted to tuples of ints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "PaperCNN",
    "WideCNN",
    "ResNetSmall",
    "net_spec",
    "build_net",
    "register_architecture",
    "registered_architectures",
]


def _int_tuple(values: Any, name: str) -> tuple[int, ...]:
    """Convert a list-like of positive ints (list, tuple, ListConfig, int) into a tuple of ints."""
    if isinstance(values, (int, np.integer)):
        values = [values]
    try:
        out = tuple(int(v) for v in values)
    except TypeError as exc:
        raise ValueError(f"{name} must be a list of positive integers, got {values!r}") from exc
    if len(out) == 0 or any(v <= 0 for v in out):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {values!r}")
    return out


def _check_dropout(dropout: float) -> float:
    dropout = float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return dropout


def _glorot_init(module: nn.Module) -> None:
    """Keras defaults: Glorot (Xavier) normal weights, zero biases, for every conv / linear layer."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_input(x: torch.Tensor, stamp_size: int) -> None:
    s = stamp_size
    if x.ndim == 4 and x.shape[1] == 1 and x.shape[-2:] == (s, s):
        return
    if x.ndim >= 2 and x.shape[-2:] != (s, s):
        hint = (f"this network takes {s}x{s}-pixel stamps: cut stamps of that size centred on the galaxies "
                f"rather than resizing, or build the network with stamp_size={x.shape[-1]} and train it")
    elif x.ndim == 3:
        hint = "add the channel axis with x.unsqueeze(1)"
    else:
        hint = "stack the stamps into a batch with one channel"
    raise ValueError(f"expected a (B, 1, {s}, {s}) tensor of normalised stamps, got shape {tuple(x.shape)}; {hint}")


class PaperCNN(nn.Module):
    """The network of Springer et al. (2018), Table 2 (107,866 parameters for 32x32 stamps).

    ===================================================  ==========
    layer                                                output
    ===================================================  ==========
    input (per-stamp normalised)                         1 x 32 x 32
    Conv 5x5 x 64, stride 3, no padding ("valid"), ReLU  64 x 10 x 10
    Conv 1x1 x 40, ReLU                                  40 x 10 x 10
    Conv 1x1 x 10, ReLU                                  10 x 10 x 10
    flatten in (row, column, channel) order              1000
    Linear 100, ReLU, Dropout                            100
    Linear 30, ReLU, Dropout                             30   <- ``features``
    Linear 2 (``head``)                                  (g1, g2)
    ===================================================  ==========

    The flatten uses the Keras (channels-last) order, ``(B, C, H, W) -> (B, H, W, C)`` before
    flattening, so that the authors' released Keras weights map one-to-one onto this module (see
    :meth:`load_keras_weights`). Weights are Glorot-normal and biases zero, as in Keras.

    Args:
        dropout: dropout probability after each of the two hidden dense layers (paper: 0.3).
        stamp_size: stamp side in pixels (paper: 32; the parameter count quoted assumes 32).
    """

    def __init__(self, dropout: float = 0.3, stamp_size: int = 32) -> None:
        super().__init__()
        self.dropout_p = _check_dropout(dropout)
        self.stamp_size = int(stamp_size)
        if self.stamp_size < 5:
            raise ValueError(f"stamp_size must be >= 5 for the 5x5 first convolution, got {stamp_size}")
        self.init_kwargs = {"dropout": self.dropout_p, "stamp_size": self.stamp_size}

        self.conv1 = nn.Conv2d(1, 64, kernel_size=5, stride=3, padding=0)
        self.conv2 = nn.Conv2d(64, 40, kernel_size=1)
        self.conv3 = nn.Conv2d(40, 10, kernel_size=1)
        side = (self.stamp_size - 5) // 3 + 1  # 10 for 32x32 stamps
        self.fc1 = nn.Linear(side * side * 10, 100)
        self.fc2 = nn.Linear(100, 30)
        self.drop1 = nn.Dropout(self.dropout_p)
        self.drop2 = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(30, 2)
        self.feature_dim = 30
        self.act = nn.ReLU()
        _glorot_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate 30-d features ``(B, 30)`` of normalised stamps ``(B, 1, H, W)``."""
        _check_input(x, self.stamp_size)
        h = self.act(self.conv1(x))
        h = self.act(self.conv2(h))
        h = self.act(self.conv3(h))
        h = h.permute(0, 2, 3, 1).flatten(1)  # Keras channels-last flatten order
        h = self.drop1(self.act(self.fc1(h)))
        return self.drop2(self.act(self.fc2(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shear estimate ``(B, 2)`` = (g1, g2) of normalised stamps ``(B, 1, H, W)``."""
        return self.head(self.features(x))

    @torch.no_grad()
    def load_keras_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Copy weights in Keras order and layout into this module.

        ``weights`` is the list returned by Keras ``model.get_weights()`` for the Table 2 model:
        ``[conv1 kernel (5,5,1,64), conv1 bias, conv2 kernel (1,1,64,40), bias, conv3 kernel
        (1,1,40,10), bias, dense1 kernel (1000,100), bias, dense2 kernel (100,30), bias,
        dense3 kernel (30,2), bias]``. Conv kernels are ``(kh, kw, in, out)`` and dense kernels
        ``(in, out)`` in Keras; they are transposed to PyTorch's ``(out, in, kh, kw)`` / ``(out, in)``.
        Both frameworks compute cross-correlations, so no kernel flip is needed.
        """
        layers = [self.conv1, self.conv2, self.conv3, self.fc1, self.fc2, self.head]
        if len(weights) != 2 * len(layers):
            raise ValueError(
                f"expected {2 * len(layers)} Keras arrays (kernel, bias for 6 layers), got {len(weights)}"
            )
        for i, layer in enumerate(layers):
            kernel = torch.as_tensor(np.asarray(weights[2 * i]), dtype=layer.weight.dtype)
            bias = torch.as_tensor(np.asarray(weights[2 * i + 1]), dtype=layer.bias.dtype)
            if isinstance(layer, nn.Conv2d):
                kernel = kernel.permute(3, 2, 0, 1)
            else:
                kernel = kernel.T
            if kernel.shape != layer.weight.shape or bias.shape != layer.bias.shape:
                raise ValueError(
                    f"Keras layer {i}: kernel/bias shapes {tuple(np.shape(weights[2 * i]))}/"
                    f"{tuple(np.shape(weights[2 * i + 1]))} do not match this module's "
                    f"{tuple(layer.weight.shape)}/{tuple(layer.bias.shape)} (after transposition)"
                )
            layer.weight.copy_(kernel)
            layer.bias.copy_(bias)


class WideCNN(nn.Module):
    """A wider / deeper plain CNN: stages of [3x3 conv (+BN) + ReLU] x ``convs_per_stage`` then 2x2
    max-pool, followed by dense hidden layers (ReLU + dropout) and a linear (g1, g2) head.

    Args:
        widths: channels of each convolutional stage (each stage halves the spatial size).
        convs_per_stage: number of 3x3 convolutions per stage.
        hidden: widths of the dense hidden layers; the last one is ``feature_dim``.
        dropout: dropout after each dense hidden layer.
        batch_norm: insert BatchNorm2d after each convolution.
        stamp_size: stamp side in pixels.
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 128),
        convs_per_stage: int = 2,
        hidden: Sequence[int] = (256, 64),
        dropout: float = 0.3,
        batch_norm: bool = True,
        stamp_size: int = 32,
    ) -> None:
        super().__init__()
        widths = _int_tuple(widths, "widths")
        hidden = _int_tuple(hidden, "hidden")
        convs_per_stage = int(convs_per_stage)
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage}")
        dropout = _check_dropout(dropout)
        self.stamp_size = int(stamp_size)
        side = self.stamp_size
        for _ in widths:
            side //= 2
        if side < 1:
            raise ValueError(f"{len(widths)} pooling stages are too many for {stamp_size}px stamps")
        self.init_kwargs = {
            "widths": list(widths),
            "convs_per_stage": convs_per_stage,
            "hidden": list(hidden),
            "dropout": dropout,
            "batch_norm": bool(batch_norm),
            "stamp_size": self.stamp_size,
        }

        layers: list[nn.Module] = []
        c_in = 1
        for width in widths:
            for _ in range(convs_per_stage):
                layers.append(nn.Conv2d(c_in, width, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU())
                c_in = width
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)

        dense: list[nn.Module] = []
        d_in = c_in * side * side
        for width in hidden:
            dense += [nn.Linear(d_in, width), nn.ReLU(), nn.Dropout(dropout)]
            d_in = width
        self.mlp = nn.Sequential(*dense)
        self.feature_dim = d_in
        self.head = nn.Linear(d_in, 2)
        _glorot_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, hidden[-1])`` of normalised stamps ``(B, 1, H, W)``."""
        _check_input(x, self.stamp_size)
        h = self.body(x)
        return self.mlp(h.permute(0, 2, 3, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shear estimate ``(B, 2)`` = (g1, g2)."""
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.act(h + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small residual network: 3x3 stem, stages of basic residual blocks (the first block of every
    stage after the first downsamples by 2), global average pooling, one dense hidden layer
    (ReLU + dropout) and a linear (g1, g2) head.

    Args:
        channels: channels of each residual stage.
        blocks_per_stage: residual blocks per stage.
        hidden: width of the dense hidden layer (= ``feature_dim``); 0 uses the pooled features
            directly (then ``features`` is the pooled vector after a ReLU-ed block output).
        dropout: dropout after the hidden layer.
        stamp_size: stamp side in pixels.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 2,
        hidden: int = 64,
        dropout: float = 0.3,
        stamp_size: int = 32,
    ) -> None:
        super().__init__()
        channels = _int_tuple(channels, "channels")
        blocks_per_stage = int(blocks_per_stage)
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        hidden = int(hidden)
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0, got {hidden}")
        dropout = _check_dropout(dropout)
        self.stamp_size = int(stamp_size)
        self.init_kwargs = {
            "channels": list(channels),
            "blocks_per_stage": blocks_per_stage,
            "hidden": hidden,
            "dropout": dropout,
            "stamp_size": self.stamp_size,
        }
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        c_in = channels[0]
        for i, c_out in enumerate(channels):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if hidden > 0:
            self.mlp: nn.Module = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Dropout(dropout))
            self.feature_dim = hidden
        else:
            self.mlp = nn.Dropout(dropout)
            self.feature_dim = c_in
        self.head = nn.Linear(self.feature_dim, 2)
        _glorot_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, feature_dim)`` of normalised stamps ``(B, 1, H, W)``."""
        _check_input(x, self.stamp_size)
        h = self.pool(self.blocks(self.stem(x))).flatten(1)
        return self.mlp(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shear estimate ``(B, 2)`` = (g1, g2)."""
        return self.head(self.features(x))


def net_spec(net: nn.Module) -> dict[str, Any]:
    """``{"class_path": "module.Class", "kwargs": {...}}`` from which :func:`build_net` rebuilds ``net``.

    Requires ``net.init_kwargs`` (all architectures in this module define it).
    """
    kwargs = getattr(net, "init_kwargs", None)
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"{type(net).__name__} has no `init_kwargs` dict, so it cannot be rebuilt from a file; "
            "use one of wlshear.models.architectures or set `init_kwargs` in its constructor"
        )
    cls = type(net)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "kwargs": dict(kwargs)}


#: class path -> class of every architecture an estimator file may name (see :func:`build_net`)
_ARCHITECTURES: dict[str, type] = {}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_architecture(cls: type) -> type:
    """Allow ``cls`` (an ``nn.Module`` subclass with ``init_kwargs``) in estimator files and
    checkpoints loaded by :func:`build_net`; usable as a class decorator. Register your own
    architecture before loading a file that names it."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{cls!r} is not a torch.nn.Module subclass")
    _ARCHITECTURES[_class_path(cls)] = cls
    return cls


def registered_architectures() -> list[str]:
    """Class paths :func:`build_net` accepts."""
    return sorted(_ARCHITECTURES)


for _cls in (PaperCNN, WideCNN, ResNetSmall):
    register_architecture(_cls)


def build_net(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a network from :func:`net_spec` output.

    Only registered architectures (this module's classes and those passed to
    :func:`register_architecture`) are built: a file cannot make this import or run an arbitrary
    module or class.
    """
    try:
        class_path = str(spec["class_path"])
        kwargs = dict(spec.get("kwargs", {}))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"invalid network spec {spec!r}: needs 'class_path' and 'kwargs'") from exc
    cls = _ARCHITECTURES.get(class_path)
    if cls is None:
        raise ValueError(
            f"network class {class_path!r} is not an allowed architecture (allowed: "
            f"{', '.join(registered_architectures())}); if you trust the file and the class is yours, "
            "call wlshear.models.register_architecture(YourClass) before loading it")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot build {class_path} from the saved arguments {kwargs}: {exc}") from exc
