import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.errors import DataError
from compressor.passes.calibrate import Calibration, Moments, conv_patches
from compressor.passes.graph import ConvAttributes


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 4), h=st.integers(3, 9), w=st.integers(3, 9), kh=st.integers(1, 3),
    kw=st.integers(1, 3), stride=st.integers(1, 2), dil=st.integers(1, 2), pad=st.integers(0, 2),
)
def test_conv_patches_equal_torch_unfold(c, h, w, kh, kw, stride, dil, pad):
    if h + 2 * pad < dil * (kh - 1) + 1 or w + 2 * pad < dil * (kw - 1) + 1:
        return
    x = np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32)
    attrs = ConvAttributes((kh, kw), (stride, stride), (pad, pad, pad, pad), (dil, dil), 1)
    expected = F.unfold(torch.from_numpy(x), (kh, kw), dilation=dil, padding=pad, stride=stride)
    expected = expected.transpose(1, 2).reshape(-1, c * kh * kw).numpy()
    np.testing.assert_array_equal(conv_patches(x, attrs), expected)


def test_conv_patches_subsample_is_a_subset():
    x = np.random.default_rng(1).standard_normal((3, 2, 6, 6)).astype(np.float32)
    attrs = ConvAttributes((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    full = conv_patches(x, attrs)
    some = conv_patches(x, attrs, max_rows=10, rng=np.random.default_rng(0))
    assert some.shape == (10, 18)
    assert all((full == row).all(1).any() for row in some)


def test_moments_match_numpy():
    rows = np.random.default_rng(2).standard_normal((500, 7)) * 3 + 1
    m = Moments.zeros(7)
    m.add(rows[:200])
    m.add(rows[200:])
    np.testing.assert_allclose(m.mean, rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(m.covariance, np.cov(rows.T, bias=True), rtol=1e-4, atol=1e-4)


def test_collect_returns_intermediate_tensors(mlp, built):
    x = np.random.default_rng(3).standard_normal((300, 16)).astype(np.float32)
    calib = Calibration(x, batch_size=128)
    got = calib.collect(mlp.ir(), ["h", "y"])
    assert got["h"].shape == (300, 32)
    np.testing.assert_allclose(got["y"], built.run(mlp.proto, x), rtol=1e-5, atol=1e-5)


def test_empty_calibration_is_rejected():
    with pytest.raises(DataError, match="non-empty batch"):
        Calibration(np.zeros((0, 3), dtype=np.float32))
