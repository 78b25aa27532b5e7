"""Architectures: the paper's parameter count and layout (Keras weight compatibility) and the
common features/head interface of the alternatives."""

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from wlshear.models.architectures import PaperCNN, ResNetSmall, WideCNN, build_net, net_spec


def _n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_paper_cnn_parameter_count_and_shapes():
    net = PaperCNN()
    assert _n_params(net) == 107_866
    net.eval()
    x = torch.randn(5, 1, 32, 32)
    h = torch.relu(net.conv1(x))
    assert h.shape == (5, 64, 10, 10)
    assert net.features(x).shape == (5, 30)
    assert torch.allclose(net(x), net.head(net.features(x)))
    assert net(x).shape == (5, 2)
    # Keras-like initialisation: zero biases, Glorot-normal spread of the big dense layer
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in (net.conv1, net.fc1, net.head))
    expected_std = np.sqrt(2.0 / (1000 + 100))
    assert abs(float(net.fc1.weight.detach().std()) / expected_std - 1) < 0.05


def test_paper_cnn_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match="unsqueeze"):
        PaperCNN()(torch.randn(3, 32, 32))


def _keras_forward(x_hw, weights):
    """Reference forward pass in Keras (channels-last) layout with numpy."""
    k1, b1, k2, b2, k3, b3, d1, e1, d2, e2, d3, e3 = weights
    x = x_hw[:, :, None]  # (32, 32, 1)
    win = sliding_window_view(x, (5, 5), axis=(0, 1))[::3, ::3]  # (10, 10, 1, 5, 5)
    h = np.maximum(np.einsum("ijcab,abco->ijo", win, k1) + b1, 0)
    h = np.maximum(np.einsum("ijc,co->ijo", h, k2[0, 0]) + b2, 0)
    h = np.maximum(np.einsum("ijc,co->ijo", h, k3[0, 0]) + b3, 0)
    h = h.reshape(-1)  # Keras Flatten: row, column, channel
    h = np.maximum(h @ d1 + e1, 0)
    h = np.maximum(h @ d2 + e2, 0)
    return h @ d3 + e3


def test_keras_weight_layout_and_flatten_order():
    rng = np.random.default_rng(1)
    shapes = [(5, 5, 1, 64), (64,), (1, 1, 64, 40), (40,), (1, 1, 40, 10), (10,),
              (1000, 100), (100,), (100, 30), (30,), (30, 2), (2,)]
    weights = [rng.normal(0, 0.2, s) for s in shapes]
    net = PaperCNN().double().eval()
    net.load_keras_weights(weights)
    x = rng.normal(size=(3, 32, 32))
    ours = net(torch.from_numpy(x)[:, None]).detach().numpy()
    ref = np.stack([_keras_forward(xi, weights) for xi in x])
    assert np.abs(ref).max() > 1e-2  # not trivially zero
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError):
        net.load_keras_weights(weights[:-2])


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (WideCNN, dict(widths=[16, 32], convs_per_stage=1, hidden=[32, 16], dropout=0.1)),
        (WideCNN, dict(widths=[8, 8, 8], batch_norm=False, hidden=[8])),
        (ResNetSmall, dict(channels=[8, 16], blocks_per_stage=1, hidden=12, dropout=0.2)),
        (ResNetSmall, dict(channels=[8], hidden=0)),
    ],
)
def test_alternative_architectures_interface(cls, kwargs):
    net = cls(**kwargs).eval()
    x = torch.randn(4, 1, 32, 32)
    f = net.features(x)
    assert f.shape == (4, net.feature_dim)
    assert isinstance(net.head, torch.nn.Linear) and net.head.out_features == 2
    out = net(x)
    assert out.shape == (4, 2) and torch.isfinite(out).all()
    assert torch.allclose(out, net.head(f))
    # rebuild from the spec and copy weights: identical outputs
    clone = build_net(net_spec(net))
    clone.load_state_dict(net.state_dict())
    assert torch.allclose(clone.eval()(x), out)


def test_hydra_instantiate_with_listconfig():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "wlshear.models.WideCNN", "widths": [8, 16], "hidden": [16], "dropout": 0.2})
    net = instantiate(cfg)
    assert isinstance(net, WideCNN) and net.init_kwargs["widths"] == [8, 16]
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 2)
    with pytest.raises(ValueError, match="dropout"):
        PaperCNN(dropout=1.5)
