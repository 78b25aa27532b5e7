"""Per-stamp normalisation: zero mean, unit std, flat stamps -> zeros (never NaN)."""

import numpy as np
import torch

from wlshear.models.normalize import normalize_stamps


def test_flat_stamps_give_finite_zeros():
    for value in (0.0, 0.1, 3.7e-3, 1234.5):
        x = torch.full((2, 1, 32, 32), value, dtype=torch.float32)
        out = normalize_stamps(x)
        assert torch.isfinite(out).all()
        assert torch.equal(out, torch.zeros_like(out))
        out_2d = normalize_stamps(torch.full((32, 32), value, dtype=torch.float32))  # a single (H, W) stamp
        assert torch.equal(out_2d, torch.zeros(32, 32))


def test_random_stamps_mean_zero_std_one_and_offset_scale_invariance():
    g = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(16, 32, 32, generator=g) + 5.0
    out = normalize_stamps(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.allclose(out.mean(dim=(-2, -1)), torch.zeros(16), atol=1e-5)
    assert torch.allclose(out.std(dim=(-2, -1), unbiased=False), torch.ones(16), atol=1e-4)
    # blind to a constant background offset and to the flux scale
    x64 = x.double()
    assert torch.allclose(normalize_stamps(x64), normalize_stamps(3.0 * x64 - 7.0), atol=1e-10)
    a = x64.numpy()  # the definition, in numpy: (x - mean) / std per stamp
    ref = (a - a.mean(axis=(-2, -1), keepdims=True)) / a.std(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(normalize_stamps(x64).numpy(), ref, atol=1e-9)


def test_mixed_batch_flat_and_nan_stamps():
    x = torch.randn(3, 32, 32)
    x[1] = 2.0
    x[2, 4, 4] = float("nan")
    out = normalize_stamps(x)
    assert torch.isfinite(out[0]).all() and torch.equal(out[1], torch.zeros(32, 32))
    assert torch.isnan(out[2]).all()  # a bad pixel poisons its own stamp only
