"""WinogradConv in onnxruntime: parity with ORT's Conv over random shapes (both tile sizes, the
fast stages and their plain references), partial tiles, constant and non-constant weights, and
errors that name the op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime

EPS = float(np.finfo(np.float32).eps)
# Error bound against ORT's Conv, in units of eps * the output plane's scale (error_ratio).
# Measured worst cases over 300 random shapes (up to 64 channels, maps 1..15, pads 0..2, both
# sides' rounding included): 1.6 for F(2x2,3x3) and 12.8 for F(4x4,3x3). The transforms'
# entries (up to 5 in B^T, 8 in A^T, 1/24 in G) make F(4x4) lose about an order of magnitude
# more than F(2x2), whose transforms hold only 0, +-1 and 1/2.
ERROR_BOUND = {2: 8.0, 4: 64.0}


def conv_model(op: str, x_shape, w: np.ndarray, bias: np.ndarray | None = None,
               weight_as_input: bool = False, **attributes) -> onnx.ModelProto:
    domain = runtime.OP_DOMAIN if op == "WinogradConv" else ""
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))]
    initializers = []
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.shape)))
    else:
        initializers.append(numpy_helper.from_array(w, "W"))
    node_inputs = ["X", "W"]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "B"))
        node_inputs.append("B")
    node = helper.make_node(op, node_inputs, ["Y"], domain=domain, name="layer", **attributes)
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializers)
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        opsets.append(helper.make_opsetid(domain, runtime.OP_DOMAIN_VERSION))
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def run(model, feeds):
    return runtime.session(model).run(None, feeds)[0]


def ort_conv(x, w, b, pads):
    return run(conv_model("Conv", x.shape, w, b, pads=list(pads)), {"X": x})


def winograd(x, w, b, pads, tile, weight_as_input=False):
    model = conv_model("WinogradConv", x.shape, w, b, weight_as_input=weight_as_input,
                       pads=list(pads), tile=tile)
    feeds = {"X": x, "W": w} if weight_as_input else {"X": x}
    return run(model, feeds)


def error_ratio(y, x, w, b, pads):
    """max |y - Conv| in units of eps * the output plane's scale: the largest sum over a window
    of |x| times each filter's largest |w| (Winograd mixes every tap of a filter, and every
    input of a tile, into each output of the tile)."""
    reference = ort_conv(x, w, b, pads)
    assert y.shape == reference.shape
    w_max = np.broadcast_to(np.abs(w).max(axis=(2, 3), keepdims=True), w.shape).astype(np.float32)
    scale = ort_conv(np.abs(x), np.ascontiguousarray(w_max), None, pads).max(axis=(2, 3), keepdims=True)
    if b is not None:
        scale = scale + np.abs(b)[:, None, None]
    return float((np.abs(y - reference) / (EPS * (scale + 1e-30))).max())


def assert_within_bound(y, x, w, b, pads, tile):
    ratio = error_ratio(y, x, w, b, pads)
    assert ratio <= ERROR_BOUND[tile], ratio


@pytest.fixture(params=["fast", "reference"])
def stages(request, monkeypatch):
    """COMPRESSOR_WINOGRAD_REFERENCE: the vectorised stages + the packed-weight GEMM, or the
    plain references."""
    monkeypatch.setenv("COMPRESSOR_WINOGRAD_REFERENCE", "1" if request.param == "reference" else "0")
    return request.param


@pytest.fixture(params=["fused", "tuple"])
def schedule(request, monkeypatch):
    """COMPRESSOR_WINOGRAD_SCHEDULE: units of tile rows through all three stages, or each
    stage over the whole call (one GEMM per xi)."""
    monkeypatch.setenv("COMPRESSOR_WINOGRAD_SCHEDULE", request.param)
    return request.param


shapes = st.tuples(
    st.integers(1, 3),                                   # batch
    st.integers(1, 40), st.integers(1, 40),              # input, output channels
    st.integers(1, 13), st.integers(1, 13),              # map size (odd, 1, partial tiles)
    st.tuples(*[st.integers(0, 2)] * 4),                 # pads, asymmetric
    st.booleans(),                                       # bias
    st.sampled_from([2, 4]),                             # tile
)


@example(shape=(1, 1, 6, 1, 1, (2, 2, 0, 0), False, 2), seed=2)  # one input, 6 filters
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes, st.integers(0, 2**31 - 1))
def test_matches_ort_conv_on_random_shapes(stages, schedule, shape, seed):
    n, c, m, h, w_size, pads, with_bias, tile = shape
    top, left, bottom, right = pads
    if h + top + bottom < 3 or w_size + left + right < 3:  # the kernel must fit
        h, w_size = max(h, 3), max(w_size, 3)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w_size)).astype(np.float32)
    w = rng.standard_normal((m, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32) if with_bias else None
    y = winograd(x, w, b, pads, tile)
    assert_within_bound(y, x, w, b, pads, tile)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("size", [(1, 1), (3, 3), (5, 7), (56, 56), (14, 15)])
def test_partial_tiles_and_one_pixel_maps(tile, size, schedule):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 24, *size)).astype(np.float32)
    w = rng.standard_normal((20, 24, 3, 3)).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    assert_within_bound(winograd(x, w, b, (1, 1, 1, 1), tile), x, w, b, (1, 1, 1, 1), tile)


@pytest.mark.parametrize("tile", [2, 4])
def test_large_channels_and_batch_use_many_units(tile, schedule):
    """Batch 5 x 64 channels at 40x33: fused units that span images (auto picks fused here), or
    the by-tuple passes; 72 filters leave a half-full last panel of the packed weights."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 64, 40, 33)).astype(np.float32)
    w = rng.standard_normal((72, 64, 3, 3)).astype(np.float32) * 0.1
    assert_within_bound(winograd(x, w, None, (1, 0, 2, 1), tile), x, w, None, (1, 0, 2, 1), tile)


def test_long_by_tuple_calls_run_in_chunks(monkeypatch):
    """512 channels at 56x56, batch 3, by tuple: V and P of the whole call (87 MB) exceed the
    64 MB a chunk may hold, so the call runs as two chunks of tile rows, the second starting
    inside an image."""
    monkeypatch.setenv("COMPRESSOR_WINOGRAD_SCHEDULE", "tuple")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 512, 56, 56)).astype(np.float32)
    w = (rng.standard_normal((512, 512, 3, 3)) / 48).astype(np.float32)
    b = rng.standard_normal(512).astype(np.float32)
    assert_within_bound(winograd(x, w, b, (1, 1, 1, 1), 4), x, w, b, (1, 1, 1, 1), 4)


@pytest.mark.parametrize("tile", [2, 4])
def test_weight_as_graph_input_is_transformed_per_call(tile):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    y = winograd(x, w, None, (1, 1, 1, 1), tile, weight_as_input=True)
    assert_within_bound(y, x, w, None, (1, 1, 1, 1), tile)


def test_f4_loses_more_precision_than_f2():
    """The documented ordering: F(4x4,3x3)'s error exceeds F(2x2,3x3)'s (vs float64)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 64, 16, 16)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    torch = pytest.importorskip("torch")
    exact = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                       padding=1).numpy()
    errors = {t: np.linalg.norm(winograd(x, w, None, (1, 1, 1, 1), t) - exact) / np.linalg.norm(exact)
              for t in (2, 4)}
    assert errors[4] > errors[2]
    assert errors[4] < 1e-5


def test_zero_batch_gives_an_empty_output():
    w = np.ones((3, 2, 3, 3), np.float32)
    model = conv_model("WinogradConv", ["N", 2, 5, 5], w, None, pads=[1, 1, 1, 1])
    y = run(model, {"X": np.zeros((0, 2, 5, 5), np.float32)})
    assert y.shape == (0, 3, 5, 5)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attributes, message", [
    (dict(tile=3), "tile must be 2"),
    (dict(strides=[2, 2]), "strides"),
    (dict(dilations=[2, 1]), "dilations"),
    (dict(group=2), "group=2"),
    (dict(kernel_shape=[5, 5]), "kernel_shape"),
    (dict(pads=[1, 1]), "pads must be 4"),
    (dict(auto_pad="SAME_UPPER"), "auto_pad"),
])
def test_bad_attributes_are_ort_errors_naming_the_op(attributes, message):
    w = np.ones((3, 2, 3, 3), np.float32)
    model = conv_model("WinogradConv", [1, 2, 5, 5], w, None, **attributes)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": np.zeros((1, 2, 5, 5), np.float32)})
    assert "WinogradConv" in str(info.value)


@pytest.mark.parametrize("x_shape, w_shape, bias_shape, message", [
    ((1, 3, 5, 5), (4, 2, 3, 3), None, "channel mismatch"),
    ((1, 2, 5, 5), (4, 2, 5, 5), None, "not a 3x3 kernel"),
    ((1, 2, 5, 5), (4, 2, 3, 3), (3,), "bias B must be 1-D"),
    ((1, 2, 2, 5), (4, 2, 3, 3), None, "does not fit"),
    ((2, 5, 5), (4, 2, 3, 3), None, "must be 4-D"),
])
def test_bad_shapes_are_ort_errors_naming_the_op(x_shape, w_shape, bias_shape, message):
    w = np.ones(w_shape, np.float32)
    b = None if bias_shape is None else np.ones(bias_shape, np.float32)
    model = conv_model("WinogradConv", x_shape, w, b, weight_as_input=True)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": np.zeros(x_shape, np.float32), "W": w})
    assert "WinogradConv" in str(info.value)


def test_bad_schedule_variable_is_an_error_naming_the_op(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_WINOGRAD_SCHEDULE", "fastest")
    w = np.ones((3, 2, 3, 3), np.float32)
    with pytest.raises(Exception, match="WinogradConv.*COMPRESSOR_WINOGRAD_SCHEDULE") as info:
        run(conv_model("WinogradConv", [1, 2, 5, 5], w, None), {"X": np.zeros((1, 2, 5, 5), np.float32)})
    assert "must be auto, fused or tuple, got 'fastest'" in str(info.value)
