"""DirectConv in onnxruntime: parity with ORT's Conv (+ Relu) and with a float64 numpy
convolution over random shapes (batch, channels, filters on both sides of the row kernel /
channel tile switch, map sizes including 1, kernels, pads, bias, the fused ReLU), the plain
reference and the portable phase image, a constant weight and one given as an input, and
errors that name the op."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from .conftest import conv_model, run
from .test_im2col_conv import error_ratio, reference_im2col_conv

OP = "DirectConv"
STRIDE_ONE = ((1, 1), (1, 1))


def reference(x, w, b, pads, relu):
    y = reference_im2col_conv(x, w, b, (1, 1), pads, (1, 1), 1)
    return np.maximum(y, 0) if relu else y


def max_pool(y):
    """MaxPool 2x2, stride 2, floor, as numpy."""
    n, m, h, w = y.shape
    y = y[:, :, : h // 2 * 2, : w // 2 * 2]
    return y.reshape(n, m, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def direct_conv(x, w, b, pads, relu, weight_as_input=False, pool=False):
    extra = dict(pool=[2, 2]) if pool else {}
    model = conv_model(OP, x.shape, w, b, weight_as_input=weight_as_input, pads=list(pads),
                       activation="Relu" if relu else "", **extra)
    feeds = {"X": x, "W": w} if weight_as_input else {"X": x}
    return run(model, feeds)[0]


def ort_conv(x, w, b, pads, relu, pool=False):
    y = run(conv_model("Conv", x.shape, w, b, pads=list(pads)), {"X": x})[0]
    y = np.maximum(y, 0) if relu else y
    return max_pool(y) if pool else y


def within_bound(y, x, w, b, pads):
    exact = reference(x, w, b, pads, relu=False)
    return error_ratio(y, exact, x, w, b, (1, 1), pads, (1, 1), 1) <= 1.0


@pytest.fixture(params=["auto", "rows", "tiles", "reference", "portable"])
def stages(request, monkeypatch):
    """COMPRESSOR_DIRECT_CONV_KERNEL: UseRowKernel's choice, or the row kernel or the channel
    tiles on every shape; COMPRESSOR_DIRECT_CONV_REFERENCE: the plain loop instead;
    COMPRESSOR_DIRECT_CONV_PORTABLE: the portable phase image on AVX-512 machines too."""
    kernel = request.param if request.param in ("rows", "tiles") else "auto"
    monkeypatch.setenv("COMPRESSOR_DIRECT_CONV_KERNEL", kernel)
    monkeypatch.setenv("COMPRESSOR_DIRECT_CONV_REFERENCE", "1" if request.param == "reference" else "0")
    monkeypatch.setenv("COMPRESSOR_DIRECT_CONV_PORTABLE", "1" if request.param == "portable" else "0")
    return request.param


cases = st.fixed_dictionaries({
    "batch": st.integers(1, 3),
    "channels": st.integers(1, 12),
    "filters": st.sampled_from([1, 2, 5, 6, 8, 11, 16, 17, 24, 40, 70]),
    "size": st.tuples(st.integers(1, 14), st.integers(1, 14)),
    "kernel": st.tuples(st.integers(1, 5), st.integers(1, 5)),
    "pads": st.tuples(*[st.integers(0, 2)] * 4),
    "bias": st.booleans(),
    "relu": st.booleans(),
    "pool": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})


def make_case(case):
    (h, wd), (kh, kw) = case["size"], case["kernel"]
    top, left, bottom, right = case["pads"]
    assume(h + top + bottom >= kh and wd + left + right >= kw)
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["batch"], case["channels"], h, wd)).astype(np.float32)
    w = rng.standard_normal((case["filters"], case["channels"], kh, kw)).astype(np.float32)
    b = rng.standard_normal(case["filters"]).astype(np.float32) if case["bias"] else None
    return x, w, b, case["pads"], case["relu"], case["pool"]


@example(case=dict(batch=1, channels=1, filters=1, size=(1, 1), kernel=(1, 1),
                   pads=(0, 0, 0, 0), bias=True, relu=True, pool=False, seed=0))
@example(case=dict(batch=2, channels=1, filters=6, size=(14, 14), kernel=(5, 5),
                   pads=(2, 2, 2, 2), bias=True, relu=True, pool=True, seed=1))     # LeNet-5's first layer
@example(case=dict(batch=2, channels=6, filters=16, size=(7, 7), kernel=(5, 5),
                   pads=(0, 0, 0, 0), bias=True, relu=True, pool=True, seed=2))    # and its second
@example(case=dict(batch=1, channels=12, filters=70, size=(9, 5), kernel=(3, 3),
                   pads=(1, 0, 2, 1), bias=False, relu=True, pool=True, seed=3))    # two channel tiles
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_matches_ort_conv_and_the_numpy_reference(stages, case):
    x, w, b, pads, relu, pool = make_case(case)
    y = direct_conv(x, w, b, pads, relu, pool=pool)
    conv = ort_conv(x, w, b, pads, relu, pool=pool)
    assert y.shape == conv.shape
    if pool:  # the pool picks one of the unpooled outputs: they must match exactly
        np.testing.assert_array_equal(y, max_pool(direct_conv(x, w, b, pads, relu)))
        np.testing.assert_allclose(y, conv, rtol=1e-4, atol=1e-4)
        return
    if relu:
        assert (y >= 0).all()
        # ReLU only clips: where the convolution is positive, the bound of the plain sum holds
        exact = reference(x, w, b, pads, relu=False)
        scale = reference_im2col_conv(np.abs(x), np.abs(w), None if b is None else np.abs(b),
                                      (1, 1), pads, (1, 1), 1)
        bound = np.finfo(np.float32).eps * w[0].size * scale + 1e-30
        assert (np.abs(y - np.maximum(exact, 0)) <= bound).all()
    else:
        assert within_bound(y, x, w, b, pads)
    np.testing.assert_allclose(y, conv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_choice", ["auto", "rows", "tiles"])
@pytest.mark.parametrize("shape, filters, kernel, pads", [
    ((64, 1, 28, 28), 6, (5, 5), (2, 2, 2, 2)),     # LeNet-5 at batch 64: many units
    ((64, 6, 14, 14), 16, (5, 5), (0, 0, 0, 0)),
    ((2, 32, 28, 28), 32, (3, 3), (1, 1, 1, 1)),    # channel tiles
    ((1, 64, 56, 56), 80, (3, 3), (1, 1, 1, 1)),    # row blocks of one image, two tiles
    ((3, 3, 40, 33), 7, (7, 7), (3, 3, 3, 3)),
])
def test_larger_layers(shape, filters, kernel, pads, kernel_choice, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_DIRECT_CONV_KERNEL", kernel_choice)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((filters, shape[1], *kernel)) * 0.1).astype(np.float32)
    b = rng.standard_normal(filters).astype(np.float32)
    y = direct_conv(x, w, b, pads, relu=False)
    assert within_bound(y, x, w, b, pads)
    np.testing.assert_allclose(y, ort_conv(x, w, b, pads, False), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(direct_conv(x, w, b, pads, relu=True), np.maximum(y, 0),
                               rtol=0, atol=0)
    np.testing.assert_array_equal(direct_conv(x, w, b, pads, relu=True, pool=True),
                                  max_pool(np.maximum(y, 0)))


def test_weight_as_graph_input():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    for filters in (5, 24):  # the row kernel and the channel tiles
        w = rng.standard_normal((filters, 6, 3, 3)).astype(np.float32)
        y = direct_conv(x, w, None, (1, 1, 1, 1), True, weight_as_input=True)
        np.testing.assert_allclose(y, ort_conv(x, w, None, (1, 1, 1, 1), True), rtol=1e-4,
                                   atol=1e-4)


def test_zero_batch_gives_an_empty_output():
    w = np.ones((3, 2, 3, 3), np.float32)
    model = conv_model(OP, ["N", 2, 5, 5], w, None, pads=[1, 1, 1, 1])
    y = run(model, {"X": np.zeros((0, 2, 5, 5), np.float32)})[0]
    assert y.shape == (0, 3, 5, 5)
    pooled = conv_model(OP, ["N", 2, "H", 5], w, None, pool=[2, 2])  # 3x3 -> 1x1; 1 row -> none
    assert run(pooled, {"X": np.ones((2, 2, 5, 5), np.float32)})[0].shape == (2, 3, 1, 1)
    assert run(pooled, {"X": np.ones((2, 2, 3, 5), np.float32)})[0].shape == (2, 3, 0, 1)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attrs, message", [
    (dict(strides=[2, 2]), r"strides \[2, 2\] are not supported"),
    (dict(dilations=[2, 1]), r"dilations \[2, 1\] are not supported"),
    (dict(group=2), "group=2 is not supported"),
    (dict(pads=[1, 1]), "pads must be 4"),
    (dict(kernel_shape=[5, 5]), "kernel_shape"),
    (dict(activation="Sigmoid"), "activation must be"),
    (dict(pool=[3, 3]), r"pool must be \[\] or \[2, 2\]"),
])
def test_bad_attributes_are_ort_errors_naming_the_op(attrs, message):
    w = np.ones((4, 2, 3, 3), np.float32)
    model = conv_model(OP, [1, 2, 5, 5], w, None, **attrs)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": np.zeros((1, 2, 5, 5), np.float32)})
    assert OP in str(info.value)


@pytest.mark.parametrize("x_shape, w_shape, bias_shape, message", [
    ((1, 3, 5, 5), (4, 2, 3, 3), None, "channel mismatch"),
    ((1, 2, 5, 5), (4, 2, 3, 3), (3,), "bias B must be 1-D"),
    ((1, 2, 2, 5), (4, 2, 3, 3), None, "does not fit"),
    ((2, 5, 5), (4, 2, 3, 3), None, "must be 4-D"),
])
def test_bad_shapes_are_ort_errors_naming_the_op(x_shape, w_shape, bias_shape, message):
    w = np.ones(w_shape, np.float32)
    b = None if bias_shape is None else np.ones(bias_shape, np.float32)
    model = conv_model(OP, x_shape, w, b, weight_as_input=True)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": np.zeros(x_shape, np.float32), "W": w})
    assert OP in str(info.value)


@pytest.mark.parametrize("variable", ["COMPRESSOR_DIRECT_CONV_REFERENCE",
                                      "COMPRESSOR_DIRECT_CONV_KERNEL"])
def test_bad_environment_variable_is_an_error_naming_the_op(monkeypatch, variable):
    monkeypatch.setenv(variable, "yes")
    w = np.ones((3, 2, 3, 3), np.float32)
    with pytest.raises(Exception, match=f"DirectConv.*{variable}") as info:
        run(conv_model(OP, [1, 2, 5, 5], w, None), {"X": np.zeros((1, 2, 5, 5), np.float32)})
    if variable == "COMPRESSOR_DIRECT_CONV_KERNEL":  # the shared ChoiceFromEnvironment's words
        assert f"{variable} must be auto, rows or tiles, got 'yes'" in str(info.value)
