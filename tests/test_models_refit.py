"""Head refit: the attenuation correction removes the multiplicative bias of least squares."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from wlshear.models.architectures import PaperCNN
from wlshear.models.normalize import normalize_stamps
from wlshear.models.refit import compute_features, fit_head_lstsq, refit_head

G_MAX = 0.2


def _synthetic(rng, n, mixing, noise):
    g = rng.uniform(-G_MAX, G_MAX, size=(n, 2))
    feats = g @ mixing + 0.3 + noise * rng.normal(size=(n, mixing.shape[1]))
    return feats, g


def _slope_and_error(est, true):
    """Least-squares slope of est vs true with its standard error."""
    t = true - true.mean()
    slope = (t * (est - est.mean())).sum() / (t * t).sum()
    resid = est - est.mean() - slope * t
    return slope, resid.std() / np.sqrt((t * t).sum())


def test_attenuation_correction_gives_unit_slope():
    rng = np.random.default_rng(42)
    mixing = rng.normal(size=(2, 6))
    F_train, g_train = _synthetic(rng, 50_000, mixing, noise=0.25)
    F_test, g_test = _synthetic(rng, 50_000, mixing, noise=0.25)

    weight, bias, diag = fit_head_lstsq(F_train, g_train, shear_max=G_MAX)
    assert weight.shape == (2, 6) and bias.shape == (2,) and diag["rank"] == 7
    est_corr = F_test @ weight.numpy().T + bias.numpy()
    est_plain = F_test @ diag["weight_uncorrected"].T + diag["bias_uncorrected"]
    for i in range(2):
        s_plain, e_plain = _slope_and_error(est_plain[:, i], g_test[:, i])
        s_corr, e_corr = _slope_and_error(est_corr[:, i], g_test[:, i])
        assert s_plain < 1 - 20 * e_plain, (s_plain, e_plain)  # plain LS is clearly attenuated
        assert abs(s_corr - 1) < 3 * e_corr, (s_corr, e_corr)  # corrected estimator is unbiased
        # m predicts the plain attenuation
        assert abs((1 + diag["m"][i]) - s_plain) < 5 * e_plain
    assert np.all(diag["m"] < -0.05)


def test_fit_head_input_validation():
    with pytest.raises(ValueError, match="shears must be"):
        fit_head_lstsq(np.zeros((10, 3)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="more samples"):
        fit_head_lstsq(np.zeros((3, 3)), np.zeros((3, 2)))
    # features with no information: L = Var(g) -> 1 + m ~ 0: refuse rather than blow up
    rng = np.random.default_rng(0)
    g = rng.uniform(-G_MAX, G_MAX, size=(2000, 2))
    with pytest.raises(ValueError, match="1 \\+ m"):
        fit_head_lstsq(rng.normal(size=(2000, 1)), g, var_g=0.5 * G_MAX**2 / 3)


def test_refit_head_returns_new_model_with_lstsq_head():
    torch.manual_seed(0)
    net = PaperCNN().eval()
    n = 256
    x = torch.randn(n, 32, 32)
    y = (torch.rand(n, 2) * 2 - 1) * G_MAX
    meta = torch.arange(n)
    loader = DataLoader(TensorDataset(x, y, meta), batch_size=64)
    old_head = net.head.weight.detach().clone()

    new, diag = refit_head(net, loader, shear_max=G_MAX, progress=False)
    assert new is not net and torch.equal(net.head.weight, old_head)  # original untouched
    assert diag["n"] == n and diag["d"] == 30

    F, G = compute_features(net, loader, progress=False)
    w, b, _ = fit_head_lstsq(F, G, shear_max=G_MAX)
    with torch.no_grad():
        xn = normalize_stamps(x.unsqueeze(1))
        np.testing.assert_allclose(new.features(xn).numpy(), net.features(xn).numpy(), atol=1e-6)
        expected = (F @ w.numpy().T + b.numpy())
        np.testing.assert_allclose(new(xn).numpy(), expected, atol=1e-4)


def test_refit_sample_size_follows_the_architecture():
    from wlshear.models.architectures import ResNetSmall, WideCNN
    from wlshear.models.refit import head_features, refit_sample_size

    nets = {"paper": PaperCNN(), "wide": WideCNN(), "resnet": ResNetSmall()}
    assert {k: head_features(v) for k, v in nets.items()} == {"paper": 30, "wide": 64, "resnet": 64}
    assert refit_sample_size(nets["paper"], "auto") == 62 and refit_sample_size(nets["wide"], "auto") == 130
    assert refit_sample_size(nets["wide"], 20000) == 20000  # an explicit, solvable size is kept
    # the size debug=fast used before (64) cannot determine the wide head's 65 parameters: a clear
    # error naming the key and the minimum instead of a failure after training
    with pytest.raises(ValueError, match=r"refit.n=64 .*WideCNN.*refit.n >= 66"):
        refit_sample_size(nets["wide"], 64)
    with pytest.raises(ValueError, match="'auto'"):
        refit_sample_size(nets["paper"], "many")
    # with the automatic size the least-squares refit is solvable for every architecture
    rng = np.random.default_rng(0)
    for net in nets.values():
        d, n = head_features(net), refit_sample_size(net, "auto")
        feats, g = _synthetic(rng, n, rng.normal(size=(2, d)), noise=0.1)
        w, b, diag = fit_head_lstsq(feats, g, shear_max=G_MAX)
        assert w.shape == (2, d) and diag["rank"] == d + 1 and np.all(diag["m"] > -1)


def test_symmetric_refit_recovers_the_response_without_intercept():
    """Per-component symmetrised features linear in g (zero-mean, as the 8-fold average makes
    them): the no-intercept fit, corrected for attenuation, has unit slope; the bias comes from
    the plain features."""
    from wlshear.models.refit import fit_head_lstsq_symmetric

    rng = np.random.default_rng(3)
    n, d = 40_000, 5
    mix = rng.normal(size=(2, d))
    g = rng.uniform(-G_MAX, G_MAX, size=(n, 2))
    sym = g[:, :, None] * mix[:, None, :].transpose(1, 0, 2) + 0.25 * rng.normal(size=(n, 2, d))
    plain = rng.normal(size=(n, d)) + 1.0
    w, b, diag = fit_head_lstsq_symmetric(sym, plain, g, shear_max=G_MAX)
    assert w.shape == (2, d) and b.shape == (2,) and diag["symmetric"] and diag["rank"] == d
    for j in range(2):
        est = sym[:, j] @ w[j].numpy()
        slope, err = _slope_and_error(est, g[:, j])
        assert abs(slope - 1) < 3 * err and diag["m"][j] < -0.01
    np.testing.assert_allclose(b.numpy(), np.mean(g - plain @ diag["weight_uncorrected"].T, 0) / (1 + diag["m"]))
    with pytest.raises(ValueError, match="sym_features"):
        fit_head_lstsq_symmetric(sym[:, 0], plain, g)


def test_symmetric_refit_makes_the_averaged_estimator_exactly_equivariant_with_zero_offset():
    """refit_head(symmetric=True): the 8-fold average of the refit net equals the no-intercept fit
    on the symmetrised features, whatever the head's bias (it drops out); calibrated through the
    origin, the estimator maps every symmetry of a stamp to the shear's sign change (< 1e-5)."""
    from wlshear.models.estimator import ShearEstimator
    from wlshear.models.refit import fit_head_lstsq_symmetric
    from wlshear.models.symmetry import apply, shear_sign

    torch.manual_seed(1)
    net = PaperCNN().eval()
    n = 200
    x = torch.randn(n, 32, 32)
    y = (torch.rand(n, 2) * 2 - 1) * G_MAX
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    new, diag = refit_head(net, loader, shear_max=G_MAX, progress=False, symmetric=True)
    Fs, F, G = compute_features(net, loader, progress=False, symmetric=True)
    assert Fs.shape == (n, 2, 30) and F.shape == (n, 30)
    w, _, _ = fit_head_lstsq_symmetric(Fs, F, G, shear_max=G_MAX)
    est = ShearEstimator(new, calibration={"m1": 0.1, "m2": -0.05})
    g = est.predict(x.numpy(), symmetrize=True)
    np.testing.assert_allclose(g * [1.1, 0.95], np.einsum("njd,jd->nj", Fs, w.numpy()), atol=1e-5)
    with torch.no_grad():
        new.head.bias.add_(0.3)  # the bias cannot reach the symmetric estimate
    np.testing.assert_allclose(est.predict(x.numpy(), symmetrize=True), g, atol=1e-6)
    for k in range(8):
        gk = est.predict(apply(x, k).numpy(), symmetrize=True)
        np.testing.assert_allclose(gk, g * np.array(shear_sign(k)), atol=1e-5)
