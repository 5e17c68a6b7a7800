"""FFTConv in onnxruntime: parity with ORT's Conv and with the float64 numpy reference over
random shapes (kernels 1..7, maps including 1 and odd sizes, pads, bias; pocketfft + OpenBLAS and
the plain reference stages), overlap-save tiles on 224 x 224 maps, constant and non-constant
weights, and errors that name the op."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import helper

from compressor import runtime
from compressor.passes.diffconv import ConvGeometry, window_patches
from compressor.passes.fast_conv import fft_size, reference_fft_conv

from .conftest import conv_model, run

# Error bound, relative to the output's norm: ||y - y_float64|| / ||y_float64|| for Gaussian
# inputs and weights. fp32 FFT convolution loses about eps * log2(Fh * Fw) per transform and
# sums C * kH * kW products per output, so its error relative to the output grows slowly with
# the FFT size and the channels; over these tests (up to 64 channels, 7x7 kernels, FFT sizes up
# to 128) the worst seen was 6e-7. 1e-5 leaves a 15x margin and stays 10x inside fast-conv's
# default tolerance (1e-4).
ERROR_BOUND = 1e-5


def fft_model(x_shape, w, b, **attributes):
    """conftest's one-Conv model with the node turned into ai.compressor::FFTConv."""
    model = conv_model("Conv", x_shape, w, b, **attributes)
    node = model.graph.node[0]
    node.op_type, node.domain = "FFTConv", runtime.OP_DOMAIN
    if not any(o.domain == runtime.OP_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(runtime.OP_DOMAIN, runtime.OP_DOMAIN_VERSION))
    return model


def fft_conv(x, w, b, pads, weight_as_input=False):
    model = fft_model(x.shape, w, b, weight_as_input=weight_as_input, pads=list(pads))
    feeds = {"X": x, "W": w} if weight_as_input else {"X": x}
    return run(model, feeds)[0]


def ort_conv(x, w, b, pads):
    return run(conv_model("Conv", x.shape, w, b, pads=list(pads)), {"X": x})[0]


def relative_error(y, reference) -> float:
    norm = float(np.linalg.norm(reference))
    return float(np.linalg.norm(y.astype(np.float64) - reference)) / norm if norm > 0 else 0.0


def assert_matches(y, x, w, b, pads):
    exact = reference_fft_conv(x, w, b, pads)
    conv = ort_conv(x, w, b, pads)
    assert y.shape == exact.shape == conv.shape
    assert relative_error(y, exact) <= ERROR_BOUND
    assert relative_error(y, conv.astype(np.float64)) <= ERROR_BOUND


@pytest.fixture(params=["fast", "reference"])
def stages(request, monkeypatch):
    """COMPRESSOR_FFT_REFERENCE: pocketfft + OpenBLAS, or the plain reference stages."""
    monkeypatch.setenv("COMPRESSOR_FFT_REFERENCE", "1" if request.param == "reference" else "0")
    return request.param


def shapes(max_channels: int, max_map: int):
    return st.tuples(
        st.integers(1, 3),                                        # batch
        st.integers(1, max_channels), st.integers(1, max_channels),  # input, output channels
        st.integers(1, max_map), st.integers(1, max_map),         # map (odd, 1, partial tiles)
        st.integers(1, 7), st.integers(1, 7),                     # kernel
        st.tuples(*[st.integers(0, 3)] * 4),                      # pads, asymmetric
        st.booleans(),                                            # bias
    )


def make_case(shape, seed):
    n, c, m, h, wd, kh, kw, pads, with_bias = shape
    top, left, bottom, right = pads
    h, wd = max(h, kh - top - bottom), max(wd, kw - left - right)  # the kernel must fit
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, wd)).astype(np.float32)
    w = rng.standard_normal((m, c, kh, kw)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32) if with_bias else None
    return x, w, b, pads


@example(shape=(1, 1, 1, 1, 1, 1, 1, (0, 0, 0, 0), False), seed=0)  # one pixel, 1x1
@example(shape=(2, 3, 2, 1, 1, 7, 7, (3, 3, 3, 3), True), seed=1)   # 1x1 map, 7x7 kernel
@settings(max_examples=60, deadline=None)
@given(shapes(24, 40), st.integers(0, 2**31 - 1))
def test_matches_ort_conv_and_the_reference_on_random_shapes(shape, seed):
    x, w, b, pads = make_case(shape, seed)
    assert_matches(fft_conv(x, w, b, pads), x, w, b, pads)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes(5, 10), st.integers(0, 2**31 - 1))
def test_reference_stages_match_too(stages, shape, seed):
    """Both the fast stages and the plain references (direct DFTs, complex triple loop)."""
    x, w, b, pads = make_case(shape, seed)
    assert_matches(fft_conv(x, w, b, pads), x, w, b, pads)


@pytest.mark.parametrize("n, c, m, size, k", [
    (1, 64, 64, 56, 5), (2, 32, 48, 56, 7), (1, 8, 16, 224, 7), (3, 16, 8, 33, 3),
])
def test_large_maps_and_channels(n, c, m, size, k):
    """Many overlap-save tiles (224 x 224 is cut into tiles, not one 230-point transform) and
    chunks of tiles across images."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, c, size, size)).astype(np.float32)
    w = rng.standard_normal((m, c, k, k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    pads = (k // 2,) * 4
    fh, fw = fft_size((k, k), (size, size), c, m)
    assert fh < size + k - 1 or size < 100  # large maps are tiled
    assert_matches(fft_conv(x, w, b, pads), x, w, b, pads)


def test_weight_as_graph_input_is_transformed_per_call():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 17, 12)).astype(np.float32)
    w = rng.standard_normal((5, 6, 5, 3)).astype(np.float32)
    assert_matches(fft_conv(x, w, None, (2, 1, 2, 1), weight_as_input=True), x, w, None, (2, 1, 2, 1))


def test_constant_weight_spectra_follow_the_map_size():
    """One session, two map sizes (two FFT sizes): the cached spectra are recomputed."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 3, 7, 7)).astype(np.float32)
    session = runtime.session(fft_model([1, 3, "H", "W"], w, None, pads=[3, 3, 3, 3]))
    for size in (9, 60, 9):
        x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        assert_matches(session.run(None, {"X": x})[0], x, w, None, (3, 3, 3, 3))


def test_numpy_reference_is_the_direct_correlation():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 9, 8))
    w = rng.standard_normal((4, 3, 5, 2))
    b = rng.standard_normal(4)
    pads = (1, 0, 2, 1)
    patches = window_patches(x, (5, 2), ConvGeometry(pads=pads))   # [N, OH, OW, C*kH*kW]
    direct = np.einsum("nhwd,md->nmhw", patches, w.reshape(4, -1)) + b[:, None, None]
    np.testing.assert_allclose(reference_fft_conv(x, w, b, pads), direct, rtol=1e-10, atol=1e-10)


def test_fft_size_cuts_large_maps_into_tiles():
    assert fft_size((7, 7), (224, 224), 64, 64) != (230, 230)
    fh, fw = fft_size((5, 5), (8, 8), 16, 16)  # a small map: one tile covering it
    assert fh >= 12 and fw >= 12
    with pytest.raises(ValueError, match="1 GiB"):
        fft_size((7, 7), (56, 56), 8192, 8192)


def test_zero_batch_gives_an_empty_output():
    w = np.ones((3, 2, 5, 5), np.float32)
    model = fft_model(["N", 2, 7, 7], w, None, pads=[2, 2, 2, 2])
    y = run(model, {"X": np.zeros((0, 2, 7, 7), np.float32)})[0]
    assert y.shape == (0, 3, 7, 7)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attributes, message", [
    (dict(strides=[2, 2]), "strides"),
    (dict(dilations=[2, 1]), "dilations"),
    (dict(group=2), "group=2"),
    (dict(kernel_shape=[3, 3]), "kernel_shape"),
    (dict(pads=[1, 1]), "pads must be 4"),
    (dict(auto_pad="SAME_UPPER"), "auto_pad"),
])
def test_bad_attributes_are_ort_errors_naming_the_op(attributes, message):
    w = np.ones((3, 2, 5, 5), np.float32)
    model = fft_model([1, 2, 7, 7], w, None, **attributes)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": np.zeros((1, 2, 7, 7), np.float32)})
    assert "FFTConv" in str(info.value)


@pytest.mark.parametrize("x_shape, w_shape, bias_shape, message", [
    ((1, 3, 7, 7), (4, 2, 5, 5), None, "channel mismatch"),
    ((1, 2, 7, 7), (4, 2, 5, 5), (3,), "bias B must be 1-D"),
    ((1, 2, 3, 7), (4, 2, 5, 5), None, "does not fit"),
    ((2, 7, 7), (4, 2, 5, 5), None, "must be 4-D"),
    ((1, 2, 7, 7), (4, 2, 5), None, "must be 4-D"),
])
def test_bad_shapes_are_ort_errors_naming_the_op(x_shape, w_shape, bias_shape, message):
    w = np.zeros(w_shape, np.float32)
    b = None if bias_shape is None else np.ones(bias_shape, np.float32)
    model = fft_model(x_shape, w, b, weight_as_input=True)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": np.zeros(x_shape, np.float32), "W": w})
    assert "FFTConv" in str(info.value)


def test_bad_reference_variable_is_an_error_naming_the_op(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_FFT_REFERENCE", "yes")
    w = np.ones((3, 2, 5, 5), np.float32)
    with pytest.raises(Exception, match="FFTConv.*COMPRESSOR_FFT_REFERENCE"):
        run(fft_model([1, 2, 7, 7], w, None), {"X": np.zeros((1, 2, 7, 7), np.float32)})
