"""Im2colConv in onnxruntime: parity with ORT's Conv and with a float64 numpy im2col + GEMM over
random shapes (batch, channels, groups, map sizes including 1, kernels, strides, dilations,
pads, bias), the GEMM path and the plain references, errors that name the op, and CUDA against
the CPU kernel."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from .conftest import conv_model, needs_cuda, run, run_on_cuda

EPS = float(np.finfo(np.float32).eps)
OP = "Im2colConv"


def reference_im2col_conv(x, w, b, strides, pads, dilations, group):
    """im2col + GEMM in float64, per image and group: Y = W_g [M/g, D] @ P [D, OH OW]."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    top, left, bottom, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + left + right - dw * (kw - 1) - 1) // sw + 1
    p = np.empty((n, c, kh, kw, oh, ow))
    for i in range(kh):
        for j in range(kw):
            p[:, :, i, j] = xp[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh,
                               j * dw: j * dw + (ow - 1) * sw + 1: sw]
    p = p.reshape(n, group, cg * kh * kw, oh * ow)
    y = np.matmul(w.reshape(group, m // group, cg * kh * kw), p).reshape(n, m, oh, ow)
    if b is not None:
        y = y + b.astype(np.float64)[:, None, None]
    return y


def attributes(strides, pads, dilations, group):
    return dict(strides=list(strides), pads=list(pads), dilations=list(dilations), group=group)


def im2col_conv(x, w, b, strides, pads, dilations, group, weight_as_input=False):
    model = conv_model(OP, x.shape, w, b, weight_as_input=weight_as_input,
                       **attributes(strides, pads, dilations, group))
    feeds = {"X": x, "W": w} if weight_as_input else {"X": x}
    return run(model, feeds)[0]


def ort_conv(x, w, b, strides, pads, dilations, group):
    return run(conv_model("Conv", x.shape, w, b, **attributes(strides, pads, dilations, group)),
               {"X": x})[0]


def error_ratio(y, exact, x, w, b, strides, pads, dilations, group):
    """max |y - exact| in units of eps * D * the sum over the window of |x| |w| (+ |b|): the
    float32 GEMM's worst-case rounding bound for sums of D products."""
    scale = reference_im2col_conv(np.abs(x), np.abs(w), None if b is None else np.abs(b),
                                  strides, pads, dilations, group)
    depth = w[0].size
    return float((np.abs(y - exact) / (EPS * depth * scale + 1e-30)).max())


@pytest.fixture(params=["gemm", "reference"])
def stages(request, monkeypatch):
    """COMPRESSOR_IM2COL_REFERENCE: conv2d.h's Im2Col + OpenBLAS, or the plain loops."""
    monkeypatch.setenv("COMPRESSOR_IM2COL_REFERENCE", "1" if request.param == "reference" else "0")
    return request.param


cases = st.fixed_dictionaries({
    "batch": st.integers(1, 3),
    "group": st.sampled_from([1, 1, 2, 3]),
    "channels": st.integers(1, 8),           # per group
    "filters": st.integers(1, 8),            # per group
    "size": st.tuples(st.integers(1, 12), st.integers(1, 12)),
    "kernel": st.tuples(st.integers(1, 5), st.integers(1, 5)),
    "strides": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "dilations": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "pads": st.tuples(*[st.integers(0, 2)] * 4),
    "bias": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})


def make_case(case):
    g, (h, wd), (kh, kw) = case["group"], case["size"], case["kernel"]
    (dh, dw), (top, left, bottom, right) = case["dilations"], case["pads"]
    assume(h + top + bottom >= dh * (kh - 1) + 1 and wd + left + right >= dw * (kw - 1) + 1)
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["batch"], g * case["channels"], h, wd)).astype(np.float32)
    w = rng.standard_normal((g * case["filters"], case["channels"], kh, kw)).astype(np.float32)
    b = rng.standard_normal(g * case["filters"]).astype(np.float32) if case["bias"] else None
    return x, w, b, (case["strides"], case["pads"], case["dilations"], g)


@example(case=dict(batch=1, group=1, channels=1, filters=1, size=(1, 1), kernel=(1, 1),
                   strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0), bias=True, seed=0))
@example(case=dict(batch=2, group=3, channels=4, filters=2, size=(7, 5), kernel=(1, 1),
                   strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0), bias=False, seed=1))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_matches_ort_conv_and_the_numpy_reference(stages, case):
    x, w, b, geometry = make_case(case)
    y = im2col_conv(x, w, b, *geometry)
    exact = reference_im2col_conv(x, w, b, *geometry)
    conv = ort_conv(x, w, b, *geometry)
    assert y.shape == conv.shape == exact.shape
    assert error_ratio(y, exact, x, w, b, *geometry) <= 1.0
    assert error_ratio(conv, exact, x, w, b, *geometry) <= 1.0  # the bound holds for ORT too
    np.testing.assert_allclose(y, conv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, kernel, geometry", [
    ((2, 64, 56, 56), (3, 3), ((1, 1), (1, 1, 1, 1), (1, 1), 1)),   # many units, row blocks
    ((3, 32, 17, 19), (1, 1), ((1, 1), (0, 0, 0, 0), (1, 1), 4)),   # pointwise, grouped
    ((1, 16, 31, 30), (3, 3), ((2, 2), (1, 0, 1, 1), (1, 1), 16)),  # depthwise, stride 2
    ((2, 12, 20, 20), (5, 3), ((1, 2), (2, 1, 2, 1), (2, 1), 2)),
])
def test_larger_layers(shape, kernel, geometry):
    rng = np.random.default_rng(7)
    group = geometry[3]
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((48, shape[1] // group, *kernel)) * 0.1).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    y = im2col_conv(x, w, b, *geometry)
    exact = reference_im2col_conv(x, w, b, *geometry)
    assert error_ratio(y, exact, x, w, b, *geometry) <= 1.0
    np.testing.assert_allclose(y, ort_conv(x, w, b, *geometry), rtol=1e-4, atol=1e-4)


def test_weight_as_graph_input():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    geometry = ((1, 1), (1, 1, 1, 1), (1, 1), 2)
    y = im2col_conv(x, w, None, *geometry, weight_as_input=True)
    np.testing.assert_allclose(y, ort_conv(x, w, None, *geometry), rtol=1e-4, atol=1e-4)


def test_zero_batch_gives_an_empty_output():
    w = np.ones((3, 2, 3, 3), np.float32)
    model = conv_model(OP, ["N", 2, 5, 5], w, None, pads=[1, 1, 1, 1])
    y = run(model, {"X": np.zeros((0, 2, 5, 5), np.float32)})[0]
    assert y.shape == (0, 3, 5, 5)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attrs, message", [
    (dict(group=0), "group must be a positive int"),
    (dict(group=4), "channel mismatch"),
    (dict(strides=[0, 1]), "strides must be 2 positive ints"),
    (dict(dilations=[1]), "dilations must be 2 positive ints"),
    (dict(pads=[1, 1]), "pads must be 4"),
    (dict(kernel_shape=[5, 5]), "kernel_shape"),
    (dict(auto_pad="SAME_UPPER"), "auto_pad"),
])
def test_bad_attributes_are_ort_errors_naming_the_op(attrs, message):
    w = np.ones((4, 2, 3, 3), np.float32)
    model = conv_model(OP, [1, 2, 5, 5], w, None, **attrs)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": np.zeros((1, 2, 5, 5), np.float32)})
    assert OP in str(info.value)


@pytest.mark.parametrize("x_shape, w_shape, bias_shape, group, message", [
    ((1, 3, 5, 5), (4, 2, 3, 3), None, 1, "channel mismatch"),
    ((1, 4, 5, 5), (3, 2, 3, 3), None, 2, "not a multiple of group=2"),
    ((1, 2, 5, 5), (4, 2, 3, 3), (3,), 1, "bias B must be 1-D"),
    ((1, 2, 2, 5), (4, 2, 3, 3), None, 1, "does not fit"),
    ((2, 5, 5), (4, 2, 3, 3), None, 1, "must be 4-D"),
    ((1, 2, 5, 5), (4, 2, 3), None, 1, "must be 4-D"),
])
def test_bad_shapes_are_ort_errors_naming_the_op(x_shape, w_shape, bias_shape, group, message):
    w = np.ones(w_shape, np.float32)
    b = None if bias_shape is None else np.ones(bias_shape, np.float32)
    model = conv_model(OP, x_shape, w, b, weight_as_input=True, group=group)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": np.zeros(x_shape, np.float32), "W": w})
    assert OP in str(info.value)


def test_bad_reference_variable_is_an_error_naming_the_op(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_IM2COL_REFERENCE", "yes")
    w = np.ones((3, 2, 3, 3), np.float32)
    with pytest.raises(Exception, match="Im2colConv.*COMPRESSOR_IM2COL_REFERENCE"):
        run(conv_model(OP, [1, 2, 5, 5], w, None), {"X": np.zeros((1, 2, 5, 5), np.float32)})


# --- CUDA ------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@settings(max_examples=25, deadline=None)
@given(case=cases)
def test_cuda_matches_cpu(case):
    """The CUDA kernel against the CPU op, within the float32 GEMM's rounding bound of the
    float64 reference (both of them): far below the O(1) change any wrong tap would make."""
    x, w, b, geometry = make_case(case)
    model = conv_model(OP, x.shape, w, b, **attributes(*geometry))
    cpu = run(model, {"X": x}, provider="cpu")[0]
    cuda = run_on_cuda(model, {"X": x}, OP)[0]
    exact = reference_im2col_conv(x, w, b, *geometry)
    assert error_ratio(cuda, exact, x, w, b, *geometry) <= 1.0
    np.testing.assert_allclose(cuda, cpu, rtol=1e-4, atol=1e-5 * w[0].size)


@pytest.mark.cuda
@needs_cuda
def test_cuda_larger_layer_and_bad_shape():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 64, 28, 28)).astype(np.float32)
    w = (rng.standard_normal((96, 32, 3, 3)) * 0.1).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    model = conv_model(OP, x.shape, w, b, pads=[1, 1, 1, 1], group=2)
    cpu = run(model, {"X": x}, provider="cpu")[0]
    cuda = run_on_cuda(model, {"X": x}, OP)[0]
    np.testing.assert_allclose(cuda, cpu, rtol=1e-4, atol=1e-4)
    bad = conv_model(OP, (1, 4, 6, 6), np.ones((3, 2, 3, 3), np.float32))
    with pytest.raises(Exception, match="Im2colConv.*channel mismatch"):
        run(bad, {"X": np.ones((1, 4, 6, 6), np.float32)}, provider="cuda")
