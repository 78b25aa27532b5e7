"""Symmetries of the square: shear sign conventions checked against second moments, and exact
equivariance of the symmetry-averaged CNN."""

import numpy as np
import pytest
import torch

from wlshear.models.architectures import PaperCNN
from wlshear.models.normalize import normalize_stamps
from wlshear.models.symmetry import (
    apply,
    apply_np,
    shear_sign,
    shear_signs,
    symmetrize,
    transform_shear,
)


def _elliptical_gaussian(qxx, qyy, qxy, n=32):
    """Stamp with covariance [[qxx, qxy], [qxy, qyy]] in (x = column, y = row), centred at 15.5."""
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2.0
    cov_inv = np.linalg.inv([[qxx, qxy], [qxy, qyy]])
    r2 = cov_inv[0, 0] * xx**2 + 2 * cov_inv[0, 1] * xx * yy + cov_inv[1, 1] * yy**2
    return np.exp(-0.5 * r2)


def _chi(img):
    n = img.shape[0]
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2.0
    f = img.sum()
    qxx, qyy, qxy = (img * xx**2).sum() / f, (img * yy**2).sum() / f, (img * xx * yy).sum() / f
    return np.array([qxx - qyy, 2 * qxy]) / (qxx + qyy)


def test_sign_convention_matches_second_moments():
    img = _elliptical_gaussian(9.0, 4.0, 1.5)  # chi1 > 0 (along x), chi2 > 0 (along x = y)
    chi0 = _chi(img)
    assert chi0[0] > 0.1 and chi0[1] > 0.1
    for k in range(8):
        chi_k = _chi(apply_np(img, k))
        np.testing.assert_allclose(chi_k, np.array(shear_sign(k)) * chi0, atol=1e-10)
        t = apply(torch.from_numpy(img), k).numpy()
        np.testing.assert_array_equal(t, apply_np(img, k))
    # transpose: g1 flips; one-axis flip: g2 flips; quarter turn: both; half turn: none
    assert shear_sign(4) == (-1, 1)
    np.testing.assert_allclose(_chi(img[:, ::-1]), [chi0[0], -chi0[1]], atol=1e-10)
    assert shear_sign(1) == (-1, -1) and shear_sign(2) == (1, 1)
    assert sorted(map(tuple, shear_signs())) == sorted([(1, 1), (-1, -1)] * 2 + [(-1, 1), (1, -1)] * 2)


def test_eight_distinct_elements():
    x = np.arange(16.0).reshape(4, 4)
    images = {apply_np(x, k).tobytes() for k in range(8)}
    assert len(images) == 8
    with pytest.raises(ValueError):
        apply_np(x, 8)


def test_symmetrized_cnn_is_exactly_equivariant_and_raw_cnn_is_not():
    torch.manual_seed(0)
    net = PaperCNN().double().eval()
    x = normalize_stamps(torch.randn(6, 1, 32, 32, dtype=torch.float64))
    with torch.no_grad():
        base_sym = symmetrize(net, x)
        base_raw = net(x)
        raw_violation = 0.0
        for k in range(8):
            xt = apply(x, k)
            np.testing.assert_allclose(
                symmetrize(net, xt).numpy(), transform_shear(base_sym, k).numpy(), atol=1e-5, rtol=0
            )
            raw_violation = max(raw_violation, float((net(xt) - transform_shear(base_raw, k)).abs().max()))
    assert float(base_raw.abs().max()) > 1e-3  # the net outputs something non-trivial
    assert raw_violation > 1e-3  # the test could fail: the plain CNN is not equivariant


def test_symmetrize_matches_a_numpy_average_over_the_group():
    torch.manual_seed(1)
    net = PaperCNN().double().eval()
    x = torch.randn(3, 32, 32, dtype=torch.float64)

    def f_torch(s):
        return net(s.unsqueeze(1))

    def f_np(s):
        with torch.no_grad():
            return net(torch.from_numpy(s).unsqueeze(1)).numpy()

    ref = sum(transform_shear(f_np(np.ascontiguousarray(apply_np(x.numpy(), k))), k) for k in range(8)) / 8
    with torch.no_grad():
        np.testing.assert_allclose(symmetrize(f_torch, x).numpy(), ref, atol=1e-12)
