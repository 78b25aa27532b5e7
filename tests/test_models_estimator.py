"""ShearEstimator: calibrated predictions, save/load round trip, clear errors on bad files."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from wlshear.models import PaperCNN, ResNetSmall, ShearEstimator, load_estimator


@pytest.fixture
def stamps():
    return np.random.default_rng(3).normal(0, 0.01, size=(37, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("net_factory", [PaperCNN, lambda: ResNetSmall(channels=[8, 16], blocks_per_stage=1)])
def test_save_load_roundtrip_identical(tmp_path, stamps, net_factory):
    torch.manual_seed(0)
    est = ShearEstimator(net_factory(), calibration={"m1": 0.1, "c1": 0.01, "m2": -0.05, "c2": 0.0},
                         metadata={"cfg": OmegaConf.create({"lr": 3e-4, "widths": [1, 2]}), "n": np.int64(5)})
    path = est.save(tmp_path / "sub" / "est.pt")
    loaded = load_estimator(path)
    for sym in (True, False):
        a = est.predict(stamps, symmetrize=sym, batch_size=10)
        b = loaded.predict(stamps, symmetrize=sym, batch_size=10)
        assert a.shape == (37, 2) and a.dtype == np.float64
        np.testing.assert_array_equal(a, b)  # same weights, same batching: bit-identical
        # batch size only changes float32 summation order
        np.testing.assert_allclose(loaded.predict(stamps, symmetrize=sym, batch_size=1000), a, atol=1e-6)
    assert loaded.calibration == est.calibration
    assert loaded.metadata["cfg"] == {"lr": 3e-4, "widths": [1, 2]} and loaded.metadata["n"] == 5
    # the file needs no unpickling of arbitrary objects
    assert torch.load(path, weights_only=True)["format"] == "wlshear-estimator"


def test_calibration_inverts_bias_and_torch_input(stamps):
    torch.manual_seed(0)
    est = ShearEstimator(PaperCNN())
    raw = est.predict(stamps)
    est.set_calibration(m1=0.25, c1=0.02, m2=-0.5, c2=-0.01)
    cal = est.predict(torch.from_numpy(stamps)[:, None])
    np.testing.assert_allclose(cal[:, 0], (raw[:, 0] - 0.02) / 1.25, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cal[:, 1], (raw[:, 1] + 0.01) / 0.5, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="1 \\+ m"):
        est.set_calibration(m1=-1.0)


def test_symmetrized_prediction_blind_to_offset_and_flags(stamps):
    torch.manual_seed(0)
    est = ShearEstimator(PaperCNN())
    np.testing.assert_allclose(est.predict(stamps), est.predict(stamps * 2.0 + 0.5), atol=1e-5)
    bad = stamps.copy()
    bad[3, 0, 0] = np.nan
    g, failed = est.predict_with_flags(bad)
    assert failed.sum() == 1 and failed[3] and np.isnan(g[3]).all() and np.isfinite(g[~failed]).all()
    with pytest.raises(ValueError, match="stamps\\[None\\]"):
        est.predict(stamps[0])


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no estimator file"):
        load_estimator(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file at all")
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_estimator(garbage)
    good = ShearEstimator(PaperCNN()).save(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_estimator(truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="neither a wlshear estimator"):
        load_estimator(other)
    notdict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), notdict)
    with pytest.raises(ValueError, match="does not contain"):
        load_estimator(notdict)


def test_big_endian_stamps_from_fits(tmp_path, stamps):
    """FITS cubes load big-endian (what the README snippet reads from stamps.fits): same shears."""
    from astropy.io import fits

    fits.PrimaryHDU(stamps).writeto(tmp_path / "s.fits")
    big = fits.getdata(tmp_path / "s.fits")
    assert not big.dtype.isnative
    torch.manual_seed(0)
    est = ShearEstimator(PaperCNN(), calibration={"m1": 0.1, "c1": 0.01})
    np.testing.assert_array_equal(est.predict(big, symmetrize=True), est.predict(stamps, symmetrize=True))
