"""LSHWindowConv in onnxruntime: equal to ORT's Conv with one window per bucket, equal to the
numpy reference of the same hashing (same planes: same buckets, same outputs), error paths
naming the op, a fuzz over random shapes and attributes, and CUDA against CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime
from compressor.passes.diffconv import ConvGeometry, window_patches
from compressor.passes.lsh_window import make_planes, reference_lsh_window_conv

from .conftest import needs_cuda, run_on_cuda

OP = "LSHWindowConv"


def window_model(x_shape, w, planes, bias=None, buckets=True, **attributes) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.asarray(planes), "P")]
    names = ["X", "W", "P"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "B"))
        names.append("B")
    outputs = ["Y", "S"] if buckets else ["Y"]
    node = helper.make_node(OP, names, outputs, domain=runtime.OP_DOMAIN, name="layer", **attributes)
    graph_outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    if buckets:
        graph_outputs.append(helper.make_tensor_value_info("S", TensorProto.INT64, None))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                              graph_outputs, inits)
    return helper.make_model(graph, ir_version=9, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid(runtime.OP_DOMAIN, runtime.OP_DOMAIN_VERSION)])


def conv_model(x_shape, w, bias, g: ConvGeometry) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w, "W")] + ([numpy_helper.from_array(bias, "B")] if bias is not None else [])
    node = helper.make_node("Conv", ["X", "W"] + (["B"] if bias is not None else []), ["Y"],
                            strides=list(g.strides), pads=list(g.pads), dilations=list(g.dilations))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])


def geometry_attributes(g: ConvGeometry) -> dict:
    return dict(strides=list(g.strides), pads=list(g.pads), dilations=list(g.dilations))


def run(model, feeds, provider="cpu"):
    return runtime.session(model, provider=provider).run(None, feeds)


def tolerance(x, w):
    return 1e-5 * w[0].size * float(np.abs(x).max() + 1) * float(np.abs(w).max() + 1)


def margin(x, w, planes, g) -> float:
    """Smallest |projection| of a window relative to the largest: codes only compare across
    float summation orders when no window sits on a plane. All-zero windows project exactly
    to the offset on every implementation, so they are left out."""
    patches = window_patches(x, w.shape[2:], g).reshape(-1, w[0].size).astype(np.float64)
    patches = patches[np.abs(patches).sum(1) > 0]
    if len(patches) == 0:
        return 1.0
    projections = patches @ planes[:, :-1].T.astype(np.float64) + planes[:, -1]
    return float(np.abs(projections).min() / (np.abs(projections).max() + 1e-30))


conv_cases = st.fixed_dictionaries(dict(
    n=st.integers(1, 3), c=st.integers(1, 6), m=st.integers(1, 40), h=st.integers(1, 11),
    w=st.integers(1, 11), kh=st.integers(1, 3), kw=st.integers(1, 3), sh=st.integers(1, 2),
    sw=st.integers(1, 2), dh=st.integers(1, 2), dw=st.integers(1, 2),
    pads=st.tuples(*[st.integers(0, 2)] * 4), bias=st.booleans(), seed=st.integers(0, 2**31 - 1),
))


def make_case(case, zeros: bool = True):
    top, left, bottom, right = case["pads"]
    assume(case["h"] + top + bottom >= case["dh"] * (case["kh"] - 1) + 1)
    assume(case["w"] + left + right >= case["dw"] * (case["kw"] - 1) + 1)
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"])).astype(np.float32)
    if zeros:  # like ReLU activations, with flat regions
        x = np.maximum(np.round(x * 2) / 2, 0).astype(np.float32)
    w = rng.standard_normal((case["m"], case["c"], case["kh"], case["kw"])).astype(np.float32)
    b = rng.standard_normal(case["m"]).astype(np.float32) if case["bias"] else None
    g = ConvGeometry((case["sh"], case["sw"]), case["pads"], (case["dh"], case["dw"]))
    return rng, x, w, b, g


# --- one window per bucket: ORT Conv ---------------------------------------------------------


@pytest.mark.parametrize("g", [ConvGeometry(), ConvGeometry(pads=(1, 1, 1, 1)),
                               ConvGeometry((2, 2), (1, 2, 0, 1)), ConvGeometry((1, 2), (2, 0, 1, 1), (2, 1))])
def test_distinct_windows_each_in_its_bucket_equal_ort_conv(g):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 12, 13)).astype(np.float32)  # distinct windows
    w = rng.standard_normal((24, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    planes = make_planes(1, 32, window_patches(x, (3, 3), g).reshape(-1, 36).mean(0))
    y, buckets = run(window_model(x.shape, w, planes, b, **geometry_attributes(g)), {"X": x})
    (expected,) = run(conv_model(x.shape, w, b, g), {"X": x})
    windows = buckets.shape[1] * buckets.shape[2]
    np.testing.assert_array_equal(buckets.reshape(len(x), -1), np.broadcast_to(np.arange(windows), (len(x), windows)))
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


def test_identical_windows_share_a_bucket_at_no_error():
    # A zero background: every all-zero window lands in one bucket, exactly.
    x = np.zeros((1, 2, 10, 10), np.float32)
    x[0, :, 3:6, 4:7] = np.arange(18, dtype=np.float32).reshape(2, 3, 3) + 1
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    g = ConvGeometry(pads=(1, 1, 1, 1))
    planes = make_planes(2, 32, np.full(18, 0.5))
    y, buckets = run(window_model(x.shape, w, planes, **geometry_attributes(g)), {"X": x})
    (expected,) = run(conv_model(x.shape, w, None, g), {"X": x})
    assert buckets.max() + 1 < 100  # fewer buckets than windows
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=conv_cases)
def test_property_one_window_per_bucket_equals_ort_conv(case):
    rng, x, w, b, g = make_case(case, zeros=False)
    planes = make_planes(case["seed"] % 1000, 32, np.zeros(w[0].size))
    assume(margin(x, w, planes, g) > 1e-4)
    y, buckets = run(window_model(x.shape, w, planes, b, **geometry_attributes(g)), {"X": x})
    patches = window_patches(x, w.shape[2:], g).reshape(len(x), -1, w[0].size)
    flat = buckets.reshape(len(x), -1)
    # One window per bucket, up to identical windows (all-padding ones) sharing one.
    assume(all(np.array_equal(patches[n][flat[n] == k], np.broadcast_to(
        patches[n][flat[n] == k][0], patches[n][flat[n] == k].shape))
        for n in range(len(x)) for k in range(flat[n].max() + 1)))
    (expected,) = run(conv_model(x.shape, w, b, g), {"X": x})
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


# --- the numpy reference of the same hashing -------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=conv_cases, bits=st.integers(1, 12))
def test_property_matches_reference(case, bits):
    rng, x, w, b, g = make_case(case)
    mean = window_patches(x, w.shape[2:], g).reshape(-1, w[0].size).mean(0)
    planes = make_planes(case["seed"] % 1000, bits, mean)
    assume(margin(x, w, planes, g) > 1e-4)
    y, buckets = run(window_model(x.shape, w, planes, b, **geometry_attributes(g)), {"X": x})
    expected, expected_buckets = reference_lsh_window_conv(x, w, b, planes, g)
    np.testing.assert_array_equal(buckets, expected_buckets)
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


def test_few_bits_group_windows_and_trade_accuracy():
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((2, 8, 14, 14)), 0).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    g = ConvGeometry(pads=(1, 1, 1, 1))
    (exact,) = run(conv_model(x.shape, w, None, g), {"X": x})
    mean = window_patches(x, (3, 3), g).reshape(-1, 72).mean(0)
    errors, counts = [], []
    for bits in (2, 6, 12):
        y, buckets = run(window_model(x.shape, w, make_planes(0, bits, mean), **geometry_attributes(g)), {"X": x})
        counts.append(int(buckets[0].max()) + 1)
        errors.append(float(np.linalg.norm(y - exact) / np.linalg.norm(exact)))
    assert counts[0] <= 4 and counts[0] < counts[1] < counts[2] <= 196
    assert errors[0] > errors[2]


def test_single_bucket_output_is_conv_of_the_mean_window():
    x = np.arange(2 * 5 * 5, dtype=np.float32).reshape(1, 2, 5, 5)
    w = np.ones((3, 2, 3, 3), np.float32)
    planes = np.zeros((1, 19), np.float32)  # every projection is 0: one code
    y, buckets = run(window_model(x.shape, w, planes), {"X": x})
    assert (buckets == 0).all()
    mean_window = window_patches(x, (3, 3), ConvGeometry()).reshape(-1, 18).mean(0)
    np.testing.assert_allclose(y, np.full(y.shape, mean_window.sum()), rtol=1e-5)


def test_empty_batch_and_no_buckets_output():
    w = np.ones((3, 2, 3, 3), np.float32)
    (y,) = run(window_model((0, 2, 6, 6), w, np.ones((2, 19), np.float32), buckets=False),
               {"X": np.ones((0, 2, 6, 6), np.float32)})
    assert y.shape == (0, 3, 4, 4)


# --- errors and fuzz -------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (dict(group=2), "group=2"), (dict(strides=[0, 1]), "strides"), (dict(pads=[1, 1, 1]), "pads"),
    (dict(dilations=[0, 1]), "dilations"), (dict(auto_pad="VALID"), "auto_pad"),
    (dict(kernel_shape=[5, 5]), "kernel_shape"),
])
def test_bad_attributes_are_ort_errors_naming_the_op(extra, message):
    x = np.ones((1, 2, 6, 6), np.float32)
    model = window_model(x.shape, np.ones((3, 2, 3, 3), np.float32), np.ones((2, 19), np.float32), **extra)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": x})
    assert OP in str(info.value)


@pytest.mark.parametrize("x_shape,w_shape,planes_shape,message", [
    ((2, 6, 6), (3, 2, 3, 3), (2, 19), "input X must be 4-D"),
    ((1, 2, 6, 6), (3, 2, 3), (2, 19), "weight W must be 4-D"),
    ((1, 4, 6, 6), (3, 2, 3, 3), (2, 19), "channel mismatch"),
    ((1, 2, 2, 2), (3, 2, 3, 3), (2, 19), "does not fit"),
    ((1, 2, 6, 6), (3, 2, 3, 3), (1, 2, 19), "planes must be 2-D"),
    ((1, 2, 6, 6), (3, 2, 3, 3), (2, 18), "D \\+ 1 = 19"),
    ((1, 2, 6, 6), (3, 2, 3, 3), (33, 19), "1 <= K <= 32"),
    ((1, 2, 6, 6), (3, 2, 3, 3), (0, 19), "1 <= K <= 32"),
])
def test_bad_shapes_are_ort_errors_naming_the_op(x_shape, w_shape, planes_shape, message):
    model = window_model(x_shape, np.ones(w_shape, np.float32), np.ones(planes_shape, np.float32))
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": np.ones(x_shape, np.float32)})
    assert OP in str(info.value)


@settings(max_examples=60, deadline=None)
@given(x_shape=st.lists(st.integers(0, 6), min_size=3, max_size=5),
       w_shape=st.lists(st.integers(0, 5), min_size=3, max_size=5),
       planes_shape=st.lists(st.integers(0, 40), min_size=1, max_size=3),
       attributes=st.fixed_dictionaries({}, optional=dict(
           strides=st.lists(st.integers(-1, 3), min_size=1, max_size=3),
           pads=st.lists(st.integers(-1, 3), min_size=1, max_size=5),
           dilations=st.lists(st.integers(-1, 3), min_size=1, max_size=3),
           group=st.integers(0, 3))))
def test_fuzz_random_shapes_and_attributes_never_crash(x_shape, w_shape, planes_shape, attributes):
    model = window_model(x_shape, np.ones(w_shape, np.float32), np.ones(planes_shape, np.float32),
                         **attributes)
    try:
        run(model, {"X": np.ones(x_shape, np.float32)})
    except Exception as e:  # an error is fine; it must name the op
        assert OP in str(e)


# --- CUDA ------------------------------------------------------------------------------------



@pytest.mark.cuda
@needs_cuda
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=conv_cases, bits=st.integers(1, 32))
def test_cuda_matches_cpu_output_by_output(case, bits):
    rng, x, w, b, g = make_case(case)
    mean = window_patches(x, w.shape[2:], g).reshape(-1, w[0].size).mean(0)
    planes = make_planes(case["seed"] % 1000, bits, mean)
    assume(margin(x, w, planes, g) > 1e-4)
    model = window_model(x.shape, w, planes, b, **geometry_attributes(g))
    cpu_y, cpu_buckets = run(model, {"X": x}, provider="cpu")
    cuda_y, cuda_buckets = run_on_cuda(model, {"X": x}, OP)
    np.testing.assert_array_equal(cuda_buckets, cpu_buckets)
    np.testing.assert_allclose(cuda_y, cpu_y, atol=tolerance(x, w), rtol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_cuda_bad_shape_is_an_error_naming_the_op():
    model = window_model((1, 4, 6, 6), np.ones((3, 2, 3, 3), np.float32), np.ones((2, 19), np.float32))
    with pytest.raises(Exception, match="LSHWindowConv.*channel mismatch"):
        run(model, {"X": np.ones((1, 4, 6, 6), np.float32)}, provider="cuda")
