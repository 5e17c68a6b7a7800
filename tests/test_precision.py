"""The precision study: every algorithm equals the float64 reference (so the study measures
rounding, not bugs), the emulated formats order as they must, int8 matches onnxruntime's
integer ops, and the command's outputs and error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from compressor import precision_algorithms as alg
from compressor import runtime
from compressor.cli import main
from compressor.passes.diffconv import ConvGeometry
from compressor.precision import (
    PrecisionConfig,
    find_layers,
    log_add_table_error,
    measure_layer,
    parse_ranks,
)
from compressor.precision_algorithms import FORMATS, Layer, LogAddTable

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "models" / "data" / "fashion_mnist_calib.npz"
LENET = ROOT / "models" / "checkpoints" / "lenet5.pt"
FP64 = FORMATS["fp64"]

# (input shape, weight shape, strides, pads [t, l, b, r], dilations, group)
CONVS = [
    ((2, 3, 7, 6), (4, 3, 3, 3), (1, 1), (1, 0, 1, 2), (1, 1), 1),
    ((1, 5, 9, 9), (6, 5, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((2, 4, 1, 5), (3, 4, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),   # a map of height 1
    ((2, 3, 11, 10), (4, 3, 5, 5), (2, 1), (2, 2, 1, 2), (1, 1), 1),
    ((1, 2, 10, 9), (3, 2, 3, 2), (2, 3), (0, 1, 1, 0), (2, 1), 1),
    ((2, 6, 6, 6), (6, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6),   # depthwise
    ((1, 4, 5, 5), (6, 2, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 2),
]


def _conv_case(case, seed=0):
    x_shape, w_shape, strides, pads, dilations, group = case
    rng = np.random.default_rng(seed)
    layer = Layer("conv", "Conv", rng.standard_normal(w_shape), rng.standard_normal(w_shape[0]),
                  ConvGeometry(strides, pads, dilations), group)
    return layer, rng.standard_normal(x_shape)


def _torch_conv(layer: Layer, x: np.ndarray) -> np.ndarray:
    top, left, bottom, right = layer.geometry.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    return torch.nn.functional.conv2d(
        torch.from_numpy(padded), torch.from_numpy(layer.weight), torch.from_numpy(layer.bias),
        stride=layer.geometry.strides, dilation=layer.geometry.dilations,
        groups=layer.group).numpy()


def _relative(y, reference):
    return np.linalg.norm(y - reference) / np.linalg.norm(reference)


FLOAT64_ALGORITHMS = {
    "direct": alg.direct,
    "im2col": alg.im2col,
    "winograd2": lambda layer, x, f: alg.winograd(layer, x, f, 2),
    "winograd4": lambda layer, x, f: alg.winograd(layer, x, f, 4),
    "fft": alg.fft,
    "svd-full-rank": lambda layer, x, f: alg.svd(layer, x, f, 1.0),
    "log": alg.log_domain,
    "log-add-exact": lambda layer, x, f: alg.log_domain(layer, x, f, LogAddTable(None)),
}


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"x{c[0]}w{c[1]}s{c[2]}g{c[5]}")
@pytest.mark.parametrize("name", FLOAT64_ALGORITHMS)
def test_every_algorithm_in_float64_equals_the_direct_reference(name, case):
    layer, x = _conv_case(case)
    reference = _torch_conv(layer, x)
    assert np.abs(alg.direct(layer, x, FP64) - reference).max() < 1e-12 * np.abs(reference).max()
    try:
        y = FLOAT64_ALGORITHMS[name](layer, x, FP64)
    except alg.NotApplicable as e:
        # only where the algorithm cannot apply, and it says why
        assert name in ("winograd2", "winograd4", "fft") and str(e)
        assert layer.weight.shape[2:] != (3, 3) or layer.geometry.strides != (1, 1) \
            or layer.group != 1
        return
    assert y.shape == reference.shape
    assert _relative(y, reference) < 1e-12


@st.composite
def conv_cases(draw):
    """Random conv geometries: batch, channels, maps down to 1, pads, strides, dilations,
    groups, kernels (3x3 often, so Winograd is reached)."""
    group = draw(st.sampled_from([1, 1, 2]))
    c, m = group * draw(st.integers(1, 3)), group * draw(st.integers(1, 3))
    kh, kw = draw(st.sampled_from([(3, 3), (3, 3), (1, 1), (2, 3), (5, 5)]))
    strides = draw(st.sampled_from([(1, 1), (1, 1), (2, 1), (2, 2)]))
    dilations = draw(st.sampled_from([(1, 1), (1, 1), (2, 1)]))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(max(1, dilations[0] * (kh - 1) + 1 - pads[0] - pads[2]), 9))
    w = draw(st.integers(max(1, dilations[1] * (kw - 1) + 1 - pads[1] - pads[3]), 9))
    return ((draw(st.integers(1, 2)), c, h, w), (m, c // group, kh, kw), strides, pads,
            dilations, group)


@settings(max_examples=60, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_every_algorithm_in_float64_equals_torch_on_random_shapes(case, seed):
    layer, x = _conv_case(case, seed)
    reference = _torch_conv(layer, x)
    for name, algorithm in FLOAT64_ALGORITHMS.items():
        try:
            y = algorithm(layer, x, FP64)
        except alg.NotApplicable:
            assert name in ("winograd2", "winograd4", "fft")
            continue
        assert _relative(y, reference) < 1e-12, name


@pytest.mark.parametrize("name", ["direct", "svd-full-rank", "log", "log-add-exact"])
def test_matmul_algorithms_in_float64_equal_numpy(name):
    rng = np.random.default_rng(1)
    layer = Layer("fc", "Gemm", rng.standard_normal((37, 11)), rng.standard_normal(11))
    x = rng.standard_normal((13, 37))
    x[0, :5] = 0.0  # zeros: the log domain tracks them apart (log 0 = -inf)
    reference = x @ layer.weight + layer.bias
    assert _relative(FLOAT64_ALGORITHMS[name](layer, x, FP64), reference) < 1e-12


def test_log_matmul_in_float64_matches_numpy_matmul():
    rng = np.random.default_rng(2)
    rows, w = rng.standard_normal((300, 50)), rng.standard_normal((50, 7))  # two row chunks
    assert _relative(alg.log_matmul(rows, w, FP64), rows @ w) < 1e-12
    assert _relative(alg.log_add_matmul(rows, w, FP64, LogAddTable(None)), rows @ w) < 1e-10


def test_log_add_table_error_is_what_the_study_sees():
    """The table's largest error in log2 units (same-sign sums) bounds one addition's relative
    error: a single log-add of two positives is off by at most 2^e - 1."""
    report = log_add_table_error(LogAddTable(64, 8.0))
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.1, 10, 10_000), rng.uniform(0.1, 10, 10_000)
    ones = np.ones_like(a)
    log_sum, sign = alg.log_add(np.log2(a), ones, np.log2(b), ones, LogAddTable(64, 8.0), FP64)
    relative = np.abs(sign * np.exp2(log_sum) - (a + b)) / (a + b)
    assert relative.max() <= 2 ** report["same_sign_max_log2_error"] - 1 + 1e-12
    assert relative.max() > 0.5 * (2 ** report["same_sign_max_log2_error"] - 1)
    # exact corrections: a - a cancels to zero, sign 0
    log_diff, sign = alg.log_add(np.log2(a), ones, np.log2(a), -ones, LogAddTable(None), FP64)
    assert np.all(sign == 0) and np.all(np.isneginf(log_diff))


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 1e3,
                        np.float32([0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38])])
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(alg.round_bf16(x), expected)


def _errors(layer, x, names, precisions):
    config = PrecisionConfig(algorithms=names, precisions=precisions, ranks=(1.0,))
    return {(m.algorithm, m.precision): m.relative_error for m in measure_layer(layer, x, config)}


def test_error_ordering_over_formats_and_winograd_tiles():
    """fp32 error << fp16 error < bf16 error (8 significand bits against 11), and Winograd
    F(4x4,3x3) loses more than F(2x2,3x3) in fp16 (larger transform entries)."""
    rng = np.random.default_rng(5)
    layer = Layer("conv", "Conv", rng.standard_normal((16, 16, 3, 3)) * 0.1,
                  rng.standard_normal(16) * 0.1, ConvGeometry((1, 1), (1, 1, 1, 1), (1, 1)))
    x = rng.standard_normal((2, 16, 12, 12))
    errors = _errors(layer, x, ("direct", "im2col", "winograd2", "winograd4", "fft", "svd", "log"),
                     ("fp32", "fp16", "bf16"))
    for algorithm in ("direct", "im2col", "winograd2", "winograd4", "fft", "svd@1", "log"):
        assert errors[algorithm, "fp32"] < 1e-2 * errors[algorithm, "fp16"], algorithm
        assert errors[algorithm, "bf16"] > errors[algorithm, "fp16"], algorithm
    assert errors["winograd4", "fp16"] > errors["winograd2", "fp16"] > errors["direct", "fp16"]


def test_svd_error_falls_with_rank_and_int8_is_not_applicable_with_a_reason():
    layer, x = _conv_case(CONVS[1])
    config = PrecisionConfig(algorithms=("svd", "winograd4", "fft", "log"),
                             precisions=("fp32", "int8"), ranks=(0.2, 0.6, 1.0))
    got = {(m.algorithm, m.precision): m for m in measure_layer(layer, x, config)}
    assert got["svd@0.2", "fp32"].relative_error > got["svd@0.6", "fp32"].relative_error \
        > got["svd@1", "fp32"].relative_error
    assert got["svd@1", "fp32"].relative_error < 1e-6
    for name in ("winograd4", "fft", "log"):
        assert got[name, "int8"].relative_error is None
        assert "int" in got[name, "int8"].reason or "integer" in got[name, "int8"].reason


def _session(node, inputs, outputs):
    graph = helper.make_graph([node], "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return runtime.session(model)


@pytest.mark.parametrize("case", [CONVS[0], CONVS[3], CONVS[4]])
def test_int8_conv_matches_onnxruntime_conv_integer(case):
    layer, x = _conv_case(case, seed=6)
    x_scale = float(np.abs(x).max() / 127)
    q_x = np.clip(np.rint(x / x_scale), -127, 127).astype(np.int8)
    q_w, w_scale = alg.quantize_symmetric(layer.weight, axis=0)
    top, left, bottom, right = layer.geometry.pads
    sess = _session(
        helper.make_node("ConvInteger", ["x", "w"], ["y"], strides=list(layer.geometry.strides),
                         pads=[top, left, bottom, right],
                         dilations=list(layer.geometry.dilations)),
        [helper.make_tensor_value_info("x", TensorProto.INT8, None),
         helper.make_tensor_value_info("w", TensorProto.INT8, None)],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)])
    accumulator = sess.run(None, {"x": q_x, "w": q_w.astype(np.int8)})[0]
    expected = (accumulator * x_scale * w_scale.reshape(1, -1, 1, 1)).astype(np.float32) \
        + layer.bias.astype(np.float32)[:, None, None]
    got = alg.int8_gemm_layer(layer, x, x_scale)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_int8_matmul_matches_onnxruntime_matmul_integer():
    rng = np.random.default_rng(7)
    layer = Layer("fc", "MatMul", rng.standard_normal((64, 10)))
    x = rng.standard_normal((9, 64))
    x_scale = float(np.abs(x).max() / 127)
    q_x = np.clip(np.rint(x / x_scale), -127, 127).astype(np.int8)
    q_w, w_scale = alg.quantize_symmetric(layer.weight, axis=1)
    sess = _session(helper.make_node("MatMulInteger", ["a", "b"], ["y"]),
                    [helper.make_tensor_value_info("a", TensorProto.INT8, None),
                     helper.make_tensor_value_info("b", TensorProto.INT8, None)],
                    [helper.make_tensor_value_info("y", TensorProto.INT32, None)])
    accumulator = sess.run(None, {"a": q_x, "b": q_w.astype(np.int8)})[0]
    expected = (accumulator * x_scale * w_scale).astype(np.float32)
    np.testing.assert_allclose(alg.int8_gemm_layer(layer, x, x_scale), expected, rtol=1e-6)


def test_find_layers_reads_gemm_attributes_as_onnxruntime_computes_them():
    rng = np.random.default_rng(8)
    b, c = rng.standard_normal((5, 12)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "b", "c"], ["y"], name="fc", transB=1, alpha=0.5,
                          beta=2.0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(c, "c")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    (layer, input_name), = find_layers(ir.serde.deserialize_model(proto))[0]
    x = rng.standard_normal((4, 12)).astype(np.float32)
    expected = runtime.session(proto).run(None, {"x": x})[0]
    assert input_name == "x" and layer.op == "Gemm"
    np.testing.assert_allclose(alg.direct(layer, x.astype(np.float64), FP64), expected,
                               rtol=1e-5, atol=1e-5)


def test_parse_ranks():
    assert parse_ranks("0.25,0.5,0.25") == (0.25, 0.5)
    for bad, message in (("0", "0 is not a fraction"), ("1.5", "1.5 is not a fraction"),
                         ("a,b", "not a comma list")):
        with pytest.raises(Exception, match=message):
            parse_ranks(bad)


# ------------------------------------------------------------------------------ the command


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_on_lenet5_writes_the_table_json_and_png(tmp_path):
    out_json, out_png = tmp_path / "study.json", tmp_path / "study.png"
    result = invoke("precision", LENET, "--arch", "lenet5", "--data", CALIB, "--samples", "2",
                    "--json", out_json, "--plot", out_png)
    assert result.exit_code == 0, result.output
    assert "svd@0.25" in result.output and "log-add" in result.output and "n/a" in result.output
    study = json.loads(out_json.read_text())
    assert study["samples"] == 2 and len(study["layers"]) == 5  # 2 Conv + 3 Gemm
    cells = {(m["layer"], m["algorithm"], m["precision"]): m for m in study["measurements"]}
    first = study["layers"][0]["name"]
    assert cells[first, "direct", "fp32"]["relative_error"] < 1e-6
    assert cells[first, "direct", "fp16"]["relative_error"] > cells[first, "direct", "fp32"][
        "relative_error"]
    assert cells[first, "winograd4", "fp16"]["reason"] == "kernel 5x5: needs 3x3"
    assert cells[first, "fft", "int8"]["reason"]
    assert 0 < study["log_add_table"]["same_sign_max_log2_error"] < 0.1
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_to_stdout_and_layers(tmp_path):
    result = invoke("precision", LENET, "--arch", "lenet5", "--data", CALIB, "--samples", "1",
                    "--algorithms", "direct,fft", "--precisions", "fp16", "--layers",
                    "node_linear_2", "--json")
    assert result.exit_code == 0, result.output
    study = json.loads(result.output)
    assert {m["layer"] for m in study["measurements"]} == {"node_linear_2"}
    assert {(m["algorithm"], m["reason"] is None) for m in study["measurements"]} \
        == {("direct", True), ("fft", False)}


def _no_conv_model(tmp_path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    path = tmp_path / "relu.onnx"
    onnx.save(proto, path)
    np.savez(tmp_path / "data.npz", x=np.ones((3, 4), np.float32))
    return path


@pytest.mark.parametrize("args, message", [
    (("--ranks", "0"), "--ranks: 0 is not a fraction"),
    (("--ranks", "x"), "--ranks: 'x' is not a comma list"),
    (("--precisions", "fp8"), "--precisions: unknown name 'fp8'"),
    (("--algorithms", "direct,strassen"), "--algorithms: unknown name 'strassen'"),
    (("--layers", "nope"), "--layers: no layer 'nope'"),
    (("--samples", "0"), "--samples: must be at least 1"),
    (("--plot", "{tmp}/plot.jpg"), "must end in .png"),
])
def test_cli_bad_options_name_the_option_and_write_nothing(args, message, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke("precision", LENET, "--arch", "lenet5", "--data", CALIB, "--samples", "1",
                    "--json", tmp_path / "out.json", *args)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_file_and_model_without_layers(tmp_path):
    result = invoke("precision", tmp_path / "missing.onnx", "--data", CALIB)
    assert result.exit_code != 0 and "missing.onnx" in result.output
    model = _no_conv_model(tmp_path)
    result = invoke("precision", model, "--data", tmp_path / "data.npz", "--plot",
                    tmp_path / "p.png")
    assert result.exit_code != 0
    assert "no Conv, Gemm or MatMul layer with a constant weight" in result.output
    assert not (tmp_path / "p.png").exists()
