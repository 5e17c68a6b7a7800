"""LSHConv in onnxruntime: equal to ORT's Conv with every filter selected, equal to the numpy
reference of the same hashing (same planes, same tables: same selected sets, same outputs),
chained channel masks, error paths naming the op, a fuzz over random shapes and attributes,
and CUDA against CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime
from compressor.passes.diffconv import ConvGeometry
from compressor.passes.lsh_conv import (
    build_tables,
    plane_set,
    query_projections,
    query_vectors,
    reference_lsh_conv,
)

from .conftest import needs_cuda, run_on_cuda

OP = "LSHConv"


def lsh_model(x_shape, w, planes, buckets, bias=None, mask_shape=None, selected=True,
              weight_as_input=False, **attributes) -> onnx.ModelProto:
    """One LSHConv node on input X (and CM, the channel mask, when mask_shape is given)."""
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))]
    inits = [numpy_helper.from_array(np.asarray(planes), "P"),
             numpy_helper.from_array(np.asarray(buckets), "T")]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.shape)))
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    names = ["X", "W", "P", "T", ""]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "B"))
        names[4] = "B"
    if mask_shape is not None:
        inputs.append(helper.make_tensor_value_info("CM", TensorProto.BOOL, list(mask_shape)))
        names.append("CM")
    while names[-1] == "":
        names.pop()
    outputs = ["Y", "S"] if selected else ["Y"]
    node = helper.make_node(OP, names, outputs, domain=runtime.OP_DOMAIN, name="layer", **attributes)
    graph_outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    if selected:
        graph_outputs.append(helper.make_tensor_value_info("S", TensorProto.BOOL, None))
    graph = helper.make_graph([node], "g", inputs, graph_outputs, inits)
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


def run(model, feeds, provider="cpu", threads=None):
    return runtime.session(model, provider=provider, threads=threads).run(None, feeds)


def fixed_selection(tables: int, bits: int, filters: int, chosen) -> np.ndarray:
    """Bucket tables in which every bucket holds the same filters, `chosen`."""
    words = np.zeros((filters + 63) // 64, np.uint64)
    for m in chosen:
        words[m // 64] |= np.uint64(1) << np.uint64(m % 64)
    return np.broadcast_to(words, (tables, 1 << bits, len(words))).copy().view(np.int64)


def all_selected(tables: int, bits: int, filters: int) -> np.ndarray:
    """Bucket tables in which every bucket holds every filter."""
    return fixed_selection(tables, bits, filters, range(filters))


def tolerance(x, w):
    return 1e-5 * w[0].size * float(np.abs(x).max() + 1) * float(np.abs(w).max() + 1)


def margin(x, w, planes, g, query, mask=None) -> float:
    """Smallest |projection| of a query, relative to the projections' scale: hashing is only
    comparable across float summation orders when no projection sits on a plane."""
    kh, kw = w.shape[2:]
    projections = query_projections(query_vectors(x, (kh, kw), g, query, mask), planes)
    return float(np.abs(projections).min() / (np.abs(projections).max() + 1e-30))


conv_cases = st.fixed_dictionaries(dict(
    n=st.integers(1, 3), c=st.integers(1, 12), m=st.integers(1, 70), h=st.integers(1, 11),
    w=st.integers(1, 11), kh=st.integers(1, 3), kw=st.integers(1, 3), sh=st.integers(1, 2),
    sw=st.integers(1, 2), dh=st.integers(1, 2), dw=st.integers(1, 2),
    pads=st.tuples(*[st.integers(0, 2)] * 4), bias=st.booleans(), seed=st.integers(0, 2**31 - 1),
))


def make_case(case):
    top, left, bottom, right = case["pads"]
    assume(case["h"] + top + bottom >= case["dh"] * (case["kh"] - 1) + 1)
    assume(case["w"] + left + right >= case["dw"] * (case["kw"] - 1) + 1)
    rng = np.random.default_rng(case["seed"])
    x = np.maximum(rng.standard_normal((case["n"], case["c"], case["h"], case["w"])), 0).astype(np.float32)
    w = rng.standard_normal((case["m"], case["c"], case["kh"], case["kw"])).astype(np.float32)
    b = rng.standard_normal(case["m"]).astype(np.float32) if case["bias"] else None
    g = ConvGeometry((case["sh"], case["sw"]), case["pads"], (case["dh"], case["dw"]))
    return rng, x, w, b, g


# --- every filter selected: ORT Conv ----------------------------------------------------------


@pytest.mark.parametrize("g", [ConvGeometry(), ConvGeometry(pads=(1, 1, 1, 1)),
                               ConvGeometry((2, 2), (1, 2, 0, 1)), ConvGeometry((1, 2), (2, 0, 1, 1), (2, 1)),
                               ConvGeometry((2, 1), (0, 0, 0, 0), (1, 2))])
@pytest.mark.parametrize("channels", [3, 16])
@pytest.mark.parametrize("query", ["mean", "columns"])
def test_every_filter_selected_equals_ort_conv(g, channels, query):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, channels, 13, 15)).astype(np.float32)
    w = rng.standard_normal((70, channels, 3, 3)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    planes = rng.standard_normal((3, 4, channels * 9 + 1)).astype(np.float32)
    y, selected = run(lsh_model(x.shape, w, planes, all_selected(3, 4, 70), b, query=query,
                                **geometry_attributes(g)), {"X": x})
    (expected,) = run(conv_model(x.shape, w, b, g), {"X": x})
    assert selected.all()
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


def test_pointwise_conv_equals_ort_conv():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 24, 7, 9)).astype(np.float32)
    w = rng.standard_normal((40, 24, 1, 1)).astype(np.float32)
    planes = rng.standard_normal((1, 2, 25)).astype(np.float32)
    (y, _) = run(lsh_model(x.shape, w, planes, all_selected(1, 2, 40)), {"X": x})
    (expected,) = run(conv_model(x.shape, w, None, ConvGeometry()), {"X": x})
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(case=conv_cases)
def test_property_every_filter_selected_equals_ort_conv(case):
    rng, x, w, b, g = make_case(case)
    planes = rng.standard_normal((2, 3, w[0].size + 1)).astype(np.float32)
    y, selected = run(lsh_model(x.shape, w, planes, all_selected(2, 3, w.shape[0]), b,
                                **geometry_attributes(g)), {"X": x})
    (expected,) = run(conv_model(x.shape, w, b, g), {"X": x})
    assert selected.all()
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


# --- the numpy reference of the same hashing -------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=conv_cases, query=st.sampled_from(["mean", "columns"]), tables=st.integers(1, 5),
       bits=st.integers(1, 6), masked=st.booleans())
def test_property_matches_reference(case, query, tables, bits, masked):
    rng, x, w, b, g = make_case(case)
    full = plane_set(case["seed"] % 1000, tables, bits, w[0].size + 1 + 3)
    planes, buckets = build_tables(w, b, full)
    mask = rng.random((x.shape[0], x.shape[1])) > 0.3 if masked else None
    assume(margin(x, w, planes, g, query, mask) > 1e-4)
    model = lsh_model(x.shape, w, planes, buckets, b, mask_shape=mask.shape if masked else None,
                      query=query, **geometry_attributes(g))
    feeds = {"X": x} | ({"CM": mask} if masked else {})
    y, selected = run(model, feeds)
    expected, expected_selected = reference_lsh_conv(x, w, b, planes, buckets, g, query, mask)
    np.testing.assert_array_equal(selected, expected_selected)
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


# The mean query's window sums at stride 1 (each kernel entry reads one range of rows and one
# of columns): pads of every size, dilations, and kernel rows or columns that read nothing.
@pytest.mark.parametrize("size, kernel, pads, dilations", [
    ((28, 28), (3, 3), (1, 1, 1, 1), (1, 1)),
    ((13, 9), (3, 5), (0, 2, 3, 1), (1, 1)),
    ((11, 12), (3, 3), (2, 2, 2, 2), (2, 3)),
    ((2, 2), (3, 3), (3, 3, 3, 3), (3, 3)),  # the first kernel row and column read only padding
    ((7, 7), (1, 1), (0, 0, 0, 0), (1, 1)),
    ((5, 17), (5, 1), (4, 0, 0, 0), (1, 1)),
])
def test_mean_query_window_sums_at_stride_1_match_reference(size, kernel, pads, dilations):
    g = ConvGeometry((1, 1), pads, dilations)
    for seed in range(20):  # the first inputs whose projections keep clear of the planes
        rng = np.random.default_rng(seed)
        x = np.maximum(rng.standard_normal((3, 6, *size)), 0).astype(np.float32)
        w = rng.standard_normal((40, 6, *kernel)).astype(np.float32)
        planes, buckets = build_tables(w, None, plane_set(seed, 6, 5, w[0].size + 1 + 3))
        if margin(x, w, planes, g, "mean") > 1e-3:
            break
    else:
        pytest.fail("no input clear of the planes")
    model = lsh_model(x.shape, w, planes, buckets, query="mean", **geometry_attributes(g))
    y, selected = run(model, {"X": x})
    expected, expected_selected = reference_lsh_conv(x, w, None, planes, buckets, g, "mean", None)
    np.testing.assert_array_equal(selected, expected_selected)
    assert 0 < selected.mean() < 1
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


@pytest.mark.parametrize("batch", [16, 18, 19, 20, 21, 22, 23])
def test_selection_up_front_in_blocks_of_every_size_matches_reference(batch):
    # From 16 samples a small call selects first, in blocks of up to 8 samples that share one
    # pass over the planes; the last block holds batch - 16 (0: none, then 2 to 7) samples.
    # Those samples get channel levels of their own, and the planes are chosen so that none of
    # them selects what an earlier sample selects: a block that mixed up its samples (or read
    # another block's projections) could not match the reference by chance.
    rng = np.random.default_rng(batch)
    levels = rng.normal(0, 2, (batch, 5, 1, 1))
    levels[16:] += rng.normal(0, 6, (batch - 16, 5, 1, 1))
    x = np.maximum(rng.standard_normal((batch, 5, 7, 7)) + levels, 0).astype(np.float32)
    w = rng.standard_normal((64, 5, 3, 3)).astype(np.float32)
    g = ConvGeometry(pads=(1, 1, 1, 1))
    for seed in range(100):
        planes, buckets = build_tables(w, None, plane_set(seed, 6, 6, w[0].size + 1 + 3))
        if margin(x, w, planes, g, "mean") < 1e-4:
            continue
        expected, expected_selected = reference_lsh_conv(x, w, None, planes, buckets, g, "mean", None)
        earlier = {row.tobytes() for row in expected_selected[:16]}
        last = [row.tobytes() for row in expected_selected[16:]]
        if len(set(last)) == len(last) and not earlier & set(last):
            break
    else:
        pytest.fail("no planes that tell the last block's samples apart")
    y, selected = run(lsh_model(x.shape, w, planes, buckets, query="mean", **geometry_attributes(g)),
                      {"X": x})
    np.testing.assert_array_equal(selected, expected_selected)
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


# --- fixed selections: the CPU micro-kernels' tile and block boundaries ---------------------
# With stride 1 the CPU kernel computes up to 16 selected filters (32 on long rows), or any
# number when an output has at most 32 multiply-adds (7 channels 1x1 here), by its row kernel
# (lanes over windows, up to 8 filters a pass in even groups, 48 or 64 windows a chunk), and
# otherwise by channel tiles of up to 64 filters (16 per vector; gathered from the selection
# unless every filter is in).


def selection_of(kind: str, m: int, rng) -> np.ndarray:
    if kind == "odd":
        return np.arange(1, m, 2)
    if kind == "last":
        return np.array([m - 1])
    count = {"few": min(m, 11), "row-limit": min(m, 12), "tile+1": min(m, 17),
             "two-tiles": min(m, 65), "most": max(1, m - 3)}[kind]
    return np.sort(rng.choice(m, count, replace=False))


def check_fixed_selection(x, w, b, g, chosen, mask=None):
    m = w.shape[0]
    planes = np.random.default_rng(7).standard_normal((2, 3, w[0].size + 1)).astype(np.float32)
    buckets = fixed_selection(2, 3, m, chosen)
    model = lsh_model(x.shape, w, planes, buckets, b, mask_shape=None if mask is None else mask.shape,
                      **geometry_attributes(g))
    y, selected = run(model, {"X": x} | ({} if mask is None else {"CM": mask}))
    expected_selected = np.zeros(m, bool)
    expected_selected[chosen] = True
    np.testing.assert_array_equal(selected, np.broadcast_to(expected_selected, selected.shape))
    x_seen = x if mask is None else x * mask[:, :, None, None]
    (dense,) = run(conv_model(x.shape, w, b, g), {"X": x_seen})
    expected = dense * expected_selected[None, :, None, None]  # unselected: exact zeros
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)
    assert np.all(y[:, ~expected_selected] == 0)


@pytest.mark.parametrize("kind", ["odd", "last", "few", "row-limit", "tile+1", "two-tiles", "most"])
@pytest.mark.parametrize("m", [5, 40, 150])
@pytest.mark.parametrize("g,kernel", [
    (ConvGeometry(pads=(1, 1, 1, 1)), (3, 3)),
    (ConvGeometry(), (1, 1)),
    (ConvGeometry((2, 2), (1, 0, 2, 1)), (3, 3)),
    (ConvGeometry((1, 1), (2, 1, 0, 2), (2, 2)), (3, 2)),
    (ConvGeometry((2, 1), (0, 1, 1, 0), (1, 3)), (2, 3)),
])
def test_fixed_selection_equals_conv_on_the_selected_filters(kind, m, g, kernel):
    rng = np.random.default_rng(m)
    chosen = selection_of(kind, m, rng)
    x = rng.standard_normal((2, 7, 13, 11)).astype(np.float32)
    w = rng.standard_normal((m, 7) + kernel).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    check_fixed_selection(x, w, b, g, chosen)


@pytest.mark.parametrize("count", [16, 17, 25, 32, 33])
@pytest.mark.parametrize("width", [9, 30])
def test_row_kernel_and_tile_boundaries_by_row_length(count, width):
    # 17 to 32 selected filters go by rows when a row is long enough that the junk windows of
    # the padding columns cost at most an eighth of it (width 30 here), else by tiles.
    rng = np.random.default_rng(count * 100 + width)
    x = rng.standard_normal((2, 7, 6, width)).astype(np.float32)
    w = rng.standard_normal((40, 7, 3, 3)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    chosen = np.sort(rng.choice(40, count, replace=False))
    check_fixed_selection(x, w, b, ConvGeometry(pads=(1, 1, 1, 1)), chosen)


@pytest.mark.parametrize("kind", ["few", "two-tiles", "most"])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)])
def test_fixed_selection_with_channel_mask(kind, kernel):
    rng = np.random.default_rng(11)
    m = 90
    x = rng.standard_normal((3, 20, 9, 10)).astype(np.float32)
    w = rng.standard_normal((m, 20) + kernel).astype(np.float32)
    mask = rng.random((3, 20)) > 0.4
    mask[1] = True  # one sample reads every channel, the others a subset
    g = ConvGeometry(pads=(1, 1, 1, 1)) if kernel == (3, 3) else ConvGeometry()
    check_fixed_selection(x, w, None, g, selection_of(kind, m, rng), mask)


@pytest.mark.parametrize("portable", ["0", "1"])
def test_fixed_selection_portable_helpers(portable, monkeypatch):
    # COMPRESSOR_LSH_CONV_PORTABLE=1: the phase image and tile gather without AVX-512 (what
    # other CPUs run), checked on AVX-512 machines too. 150 filters: gathered by permutes up
    # to 128 filters, by a gather instruction beyond.
    monkeypatch.setenv("COMPRESSOR_LSH_CONV_PORTABLE", portable)
    rng = np.random.default_rng(12)
    for m in (100, 150):
        x = rng.standard_normal((2, 9, 12, 12)).astype(np.float32)
        w = rng.standard_normal((m, 9, 3, 3)).astype(np.float32)
        check_fixed_selection(x, w, None, ConvGeometry((1, 2), (1, 1, 1, 1)), selection_of("two-tiles", m, rng))


def test_large_batch_selects_up_front_and_uses_the_pool():
    # From 16 samples per thread the kernel selects for blocks of 8 samples first (one pass
    # over the planes per block), then convolves on the pool; a batch not a multiple of 8.
    import os

    n = 16 * (os.cpu_count() or 1) + 5
    rng = np.random.default_rng(13)
    x = np.maximum(rng.standard_normal((n, 6, 12, 12)), 0).astype(np.float32)
    w = rng.standard_normal((33, 6, 3, 3)).astype(np.float32)
    b = rng.standard_normal(33).astype(np.float32)
    g = ConvGeometry(pads=(1, 1, 1, 1))
    planes, buckets = build_tables(w, b, plane_set(5, 3, 4, 6 * 9 + 1 + 3))
    y, selected = run(lsh_model(x.shape, w, planes, buckets, b, **geometry_attributes(g)), {"X": x})
    expected, expected_selected = reference_lsh_conv(x, w, b, planes, buckets, g)
    # Samples with a projection on a plane may hash either way under another summation order.
    projections = np.abs(query_projections(query_vectors(x, (3, 3), g), planes)).reshape(n, -1)
    clear = projections.min(1) / (projections.max(1) + 1e-30) > 1e-4
    assert clear.mean() > 0.8
    assert 0 < selected.mean() < 1 and len({row.tobytes() for row in selected}) > 1
    np.testing.assert_array_equal(selected[clear], expected_selected[clear])
    np.testing.assert_allclose(y[clear], expected[clear], atol=tolerance(x, w), rtol=1e-4)


def test_selection_skips_filters_and_writes_zeros():
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal((4, 8, 10, 10)), 0).astype(np.float32)
    w = rng.standard_normal((64, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    g = ConvGeometry(pads=(1, 1, 1, 1))
    planes, buckets = build_tables(w, b, plane_set(3, 2, 5, 8 * 9 + 1 + 3))
    y, selected = run(lsh_model(x.shape, w, planes, buckets, b, **geometry_attributes(g)), {"X": x})
    assert 0 < selected.mean() < 1
    assert np.all(y[~selected] == 0)  # unselected filters: exact zeros, bias included
    (dense,) = run(conv_model(x.shape, w, b, g), {"X": x})
    np.testing.assert_allclose(y[selected], dense[selected], atol=tolerance(x, w), rtol=1e-4)


def test_channel_mask_skips_known_zero_channels_then_plain_call_is_unaffected():
    # Masked channels are treated as zero; a later call without a mask (same threads, same
    # scratch) must not see the earlier mask.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 12, 9, 9)).astype(np.float32)
    w = rng.standard_normal((30, 12, 3, 3)).astype(np.float32)
    mask = rng.random((3, 12)) > 0.5
    g = ConvGeometry(pads=(1, 1, 1, 1))
    buckets = all_selected(1, 1, 30)
    planes = rng.standard_normal((1, 1, 12 * 9 + 1)).astype(np.float32)
    y_masked, _ = run(lsh_model(x.shape, w, planes, buckets, mask_shape=mask.shape,
                                **geometry_attributes(g)), {"X": x, "CM": mask})
    (expected,) = run(conv_model(x.shape, w, None, g), {"X": x * mask[:, :, None, None]})
    np.testing.assert_allclose(y_masked, expected, atol=tolerance(x, w), rtol=1e-4)
    y_plain, _ = run(lsh_model(x.shape, w, planes, buckets, **geometry_attributes(g)), {"X": x})
    (expected,) = run(conv_model(x.shape, w, None, g), {"X": x})
    np.testing.assert_allclose(y_plain, expected, atol=tolerance(x, w), rtol=1e-4)


def test_all_channels_masked_gives_bias_of_selected_filters():
    w = np.ones((5, 3, 3, 3), np.float32)
    b = np.arange(5, dtype=np.float32) + 1
    x = np.ones((2, 3, 5, 5), np.float32)
    y, selected = run(lsh_model(x.shape, w, np.ones((1, 1, 28), np.float32), all_selected(1, 1, 5),
                                b, mask_shape=(2, 3)), {"X": x, "CM": np.zeros((2, 3), bool)})
    assert selected.all()
    np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None, None], y.shape))


def test_weight_given_as_graph_input_and_no_selected_output():
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((2, 10, 8, 8)), 0).astype(np.float32)
    w = rng.standard_normal((20, 10, 3, 3)).astype(np.float32)
    planes, buckets = build_tables(w, None, plane_set(1, 2, 3, 10 * 9 + 1 + 3))
    assert margin(x, w, planes, ConvGeometry(), "mean") > 1e-4
    (y,) = run(lsh_model(x.shape, w, planes, buckets, selected=False, weight_as_input=True),
               {"X": x, "W": w})
    expected, _ = reference_lsh_conv(x, w, None, planes, buckets)
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


def test_empty_batch():
    w = np.ones((3, 2, 3, 3), np.float32)
    y, selected = run(lsh_model((0, 2, 6, 6), w, np.ones((1, 2, 19), np.float32),
                                all_selected(1, 2, 3)), {"X": np.ones((0, 2, 6, 6), np.float32)})
    assert y.shape == (0, 3, 4, 4) and selected.shape == (0, 3)


# --- errors and fuzz -------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (dict(group=2), "group=2"), (dict(strides=[0, 1]), "strides"), (dict(strides=[1, 1, 1]), "strides"),
    (dict(pads=[1, 1, 1]), "pads"), (dict(pads=[-1, 0, 0, 0]), "pads"), (dict(dilations=[0, 1]), "dilations"),
    (dict(auto_pad="SAME_UPPER"), "auto_pad"), (dict(kernel_shape=[5, 5]), "kernel_shape"),
    (dict(query="rows"), "query"), (dict(query=3), "query"),
])
def test_bad_attributes_are_ort_errors_naming_the_op(extra, message):
    x = np.ones((1, 2, 6, 6), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    model = lsh_model(x.shape, w, np.ones((1, 2, 19), np.float32), all_selected(1, 2, 3), **extra)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": x})
    assert OP in str(info.value)


@pytest.mark.parametrize("x_shape,w_shape,planes_shape,buckets_shape,mask_shape,message", [
    ((2, 6, 6), (3, 2, 3, 3), (1, 2, 19), (1, 4, 1), None, "input X must be 4-D"),
    ((1, 2, 6, 6), (3, 2, 3), (1, 2, 19), (1, 4, 1), None, "weight W must be 4-D"),
    ((1, 4, 6, 6), (3, 2, 3, 3), (1, 2, 19), (1, 4, 1), None, "channel mismatch"),
    ((1, 2, 2, 2), (3, 2, 3, 3), (1, 2, 19), (1, 4, 1), None, "does not fit"),
    ((1, 2, 6, 6), (3, 2, 3, 3), (2, 19), (1, 4, 1), None, "planes must be 3-D"),
    ((1, 2, 6, 6), (3, 2, 3, 3), (1, 2, 18), (1, 4, 1), None, "D \\+ 1 = 19"),
    ((1, 2, 6, 6), (3, 2, 3, 3), (1, 17, 19), (1, 4, 1), None, "1 <= K <= 16"),
    ((1, 2, 6, 6), (3, 2, 3, 3), (1, 2, 19), (1, 8, 1), None, "buckets must be"),
    ((1, 2, 6, 6), (3, 2, 3, 3), (2, 2, 19), (1, 4, 1), None, "buckets must be"),
    ((1, 2, 6, 6), (3, 2, 3, 3), (1, 2, 19), (1, 4, 1), (1, 3), "channel_mask must be"),
])
def test_bad_shapes_are_ort_errors_naming_the_op(x_shape, w_shape, planes_shape, buckets_shape,
                                                 mask_shape, message):
    model = lsh_model(x_shape, np.ones(w_shape, np.float32), np.ones(planes_shape, np.float32),
                      np.zeros(buckets_shape, np.int64), mask_shape=mask_shape)
    feeds = {"X": np.ones(x_shape, np.float32)}
    if mask_shape:
        feeds["CM"] = np.ones(mask_shape, bool)
    with pytest.raises(Exception, match=message) as info:
        run(model, feeds)
    assert OP in str(info.value)


def test_bad_bias_shape_is_an_error_naming_the_op():
    w = np.ones((3, 2, 3, 3), np.float32)
    model = lsh_model((1, 2, 6, 6), w, np.ones((1, 2, 19), np.float32), all_selected(1, 2, 3),
                      bias=np.ones(4, np.float32))
    with pytest.raises(Exception, match="LSHConv.*bias B must be 1-D \\[3\\]"):
        run(model, {"X": np.ones((1, 2, 6, 6), np.float32)})


@settings(max_examples=60, deadline=None)
@given(x_shape=st.lists(st.integers(0, 6), min_size=3, max_size=5),
       w_shape=st.lists(st.integers(0, 5), min_size=3, max_size=5),
       planes_shape=st.lists(st.integers(0, 20), min_size=2, max_size=4),
       buckets_shape=st.lists(st.integers(0, 9), min_size=2, max_size=4),
       attributes=st.fixed_dictionaries({}, optional=dict(
           strides=st.lists(st.integers(-1, 3), min_size=1, max_size=3),
           pads=st.lists(st.integers(-1, 3), min_size=1, max_size=5),
           dilations=st.lists(st.integers(-1, 3), min_size=1, max_size=3),
           group=st.integers(0, 3), query=st.sampled_from(["mean", "columns", "x"]))))
def test_fuzz_random_shapes_and_attributes_never_crash(x_shape, w_shape, planes_shape,
                                                       buckets_shape, attributes):
    model = lsh_model(x_shape, np.ones(w_shape, np.float32), np.ones(planes_shape, np.float32),
                      np.full(buckets_shape, -1, np.int64), **attributes)
    try:
        run(model, {"X": np.ones(x_shape, np.float32)})
    except Exception as e:  # an error is fine; it must name the op (or be ORT's own type check)
        assert OP in str(e) or "InvalidGraph" in type(e).__name__ or "INVALID_GRAPH" in str(e)


# --- CUDA ------------------------------------------------------------------------------------



@pytest.mark.cuda
@needs_cuda
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=conv_cases, query=st.sampled_from(["mean", "columns"]), tables=st.integers(1, 4),
       bits=st.integers(1, 6), masked=st.booleans())
def test_cuda_matches_cpu_output_by_output(case, query, tables, bits, masked):
    rng, x, w, b, g = make_case(case)
    planes, buckets = build_tables(w, b, plane_set(case["seed"] % 1000, tables, bits, w[0].size + 4))
    mask = rng.random((x.shape[0], x.shape[1])) > 0.3 if masked else None
    assume(margin(x, w, planes, g, query, mask) > 1e-4)
    model = lsh_model(x.shape, w, planes, buckets, b, mask_shape=mask.shape if masked else None,
                      query=query, **geometry_attributes(g))
    feeds = {"X": x} | ({"CM": mask} if masked else {})
    cpu_y, cpu_selected = run(model, feeds, provider="cpu")
    cuda_y, cuda_selected = run_on_cuda(model, feeds, OP)
    np.testing.assert_array_equal(cuda_selected, cpu_selected)
    np.testing.assert_allclose(cuda_y, cpu_y, atol=tolerance(x, w), rtol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_cuda_bad_shape_is_an_error_naming_the_op():
    model = lsh_model((1, 4, 6, 6), np.ones((3, 2, 3, 3), np.float32),
                      np.ones((1, 2, 19), np.float32), all_selected(1, 2, 3))
    with pytest.raises(Exception, match="LSHConv.*channel mismatch"):
        run(model, {"X": np.ones((1, 4, 6, 6), np.float32)}, provider="cuda")
