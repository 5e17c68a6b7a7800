"""QuantizeInt8Pass: onnxruntime's static QDQ quantization with a node-by-node choice.

What is checked: the quantized model passes onnx.checker, runs in onnxruntime and agrees with
the fp32 model; each node's recorded int8 error equals a numpy computation of that node with
its inputs exact; nodes over the error bound, custom-op nodes and nodes a (fake, deterministic)
latency table measures slower stay fp32 with the reason; ``int8_nodes`` names exactly the nodes
that onnxruntime's own optimiser fuses into int8 kernels."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime
from compressor.errors import DataError, OptionError, PassError
from compressor.latency import LatencyContext
from compressor.passes.calibrate import Calibration
from compressor.passes.diffconv import DiffConvConfig, ReplaceConvWithDiffConvPass
from compressor.passes.quantize import (
    INT8_KERNELS,
    INT8_PASS_THROUGH,
    QuantizeConfig,
    QuantizeInt8Pass,
    calibration_feeds,
    int8_candidate,
    int8_nodes,
)

RNG = np.random.default_rng(7)


def _proto(model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model


def _run(model, feeds) -> np.ndarray:
    return runtime.session(_proto(model)).run(None, feeds)[0]


def _ort_int8_nodes(proto: onnx.ModelProto, tmp_path) -> set[str]:
    """The reference for int8_nodes: the nodes onnxruntime's optimiser itself turns into int8
    kernels (QLinearConv, QGemm, ...) or that then run on int8 values (MaxPool on a
    QLinearConv's output), read from the optimised graph it writes (layout left as it is)."""
    path = str(tmp_path / "optimised.onnx")
    so = runtime.session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = path
    if runtime.uses_custom_ops(proto):
        runtime.register_library(so)
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    optimised = onnx.load(path)
    kernels = set(INT8_KERNELS.values()) | {"MatMulIntegerToFloat"}
    int8_tensors: set[str] = set()
    found = set()
    for node in optimised.graph.node:  # topological order
        if node.op_type in kernels or node.op_type == "QuantizeLinear":
            int8_tensors.update(node.output)
            if node.op_type != "QuantizeLinear":
                found.add(node.name)
        elif node.op_type in INT8_PASS_THROUGH and node.input[0] in int8_tensors:
            int8_tensors.update(node.output)
            found.add(node.name)
    return found


def _records(result):
    return {r.name: r for r in result.layers}


# --------------------------------------------------------------------------- the zoo's LeNet-5


@pytest.fixture(scope="module")
def lenet5():
    """The trained LeNet-5 as the pipeline hands it to its passes (cleaned up), with 256
    calibration images and 256 held-out images."""
    from compressor.data import load_data
    from compressor.io import load_model
    from compressor.models import zoo
    from compressor.passes.cleanup import CleanupPass

    checkpoint = zoo.get("lenet5").checkpoint
    if not checkpoint.is_file():
        pytest.skip("no lenet5 checkpoint")
    loaded = load_model(checkpoint, arch="lenet5")
    model = CleanupPass()(ir.serde.deserialize_model(loaded.proto)).model
    proto = ir.serde.serialize_model(model)
    proto.ir_version = 10
    calib = load_data(str(zoo.DATA_DIR / "fashion_mnist_calib.npz")).x[:256]
    held_out = load_data(str(zoo.DATA_DIR / "fashion_mnist_eval.npz")).x[:256]
    return proto, calib, held_out


def test_lenet5_int8_runs_and_agrees_with_fp32(lenet5, tmp_path):
    proto, calib, held_out = lenet5
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(calib))(ir.serde.deserialize_model(proto))
    quantized = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(quantized, full_check=True)

    records = _records(result)
    compute = [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(compute) == 5
    assert all(records[name].skipped is None for name in compute)
    assert all(0 < records[name].error < 0.05 for name in compute)
    assert result.stats["int8_compute_nodes"] == 5
    assert result.stats["bytes_after"] < 0.4 * result.stats["bytes_before"]  # int8 weights

    feeds = {"input": held_out}
    y_ref, y = _run(proto, feeds), _run(quantized, feeds)
    assert np.mean(y.argmax(1) == y_ref.argmax(1)) >= 0.97
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 0.05

    # every int8 node and nothing else, as onnxruntime's own optimiser fuses them
    listed = int8_nodes(quantized)
    assert set(listed) == _ort_int8_nodes(quantized, tmp_path)
    assert set(compute) <= set(listed)
    assert result.stats["int8_nodes"] == len(listed)
    assert {r.name for r in result.changed} == set(listed)
    assert int8_nodes(proto) == []


# --------------------------------------------------------------------------- hand-built graphs


def _mlp(outlier: str | None = None) -> onnx.ModelProto:
    """x(16) -> fc1 (32) -> Relu -> fc2 (10).

    outlier 'weight': fc1's unit 0 never fires (bias -100) and fc2 weighs it 1000x: each of
    fc2's weight rows is scaled for that one weight, its other weights share a few int8 levels
    (fc2 alone errs). outlier 'activation': fc1's unit 0 is 1000x larger and fc2 hardly reads
    it: the range of fc1's output, fc2's input, is set by that unit (fc2 errs because of what
    fc1 writes in int8)."""
    w1 = RNG.standard_normal((32, 16)) / 4
    b1 = RNG.standard_normal(32) * 0.1
    w2 = RNG.standard_normal((10, 32)) / 6
    if outlier == "weight":
        w1[0] *= 1e-3
        b1[0] = -100.0
        w2[:, 0] = 1000.0
    elif outlier == "activation":
        w1[0] *= 1000
        w2[:, 0] *= 1e-4
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": RNG.standard_normal(10) * 0.1}
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _mlp_inputs(n=256) -> np.ndarray:
    return RNG.standard_normal((n, 16)).astype(np.float32)


def _initializer(proto, name) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == name)


def _q_params(proto, tensor) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of the QuantizeLinear of ``tensor`` in a QDQ model."""
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return _initializer(proto, q.input[1]), _initializer(proto, q.input[2])


def _fake_quantize(x, scale, zero_point):
    info = np.iinfo(zero_point.dtype)
    q = np.clip(np.rint(x / scale) + zero_point.astype(np.int32), info.min, info.max)
    return (q - zero_point.astype(np.int32)) * scale


def _dequantized_weight(proto, weight):
    dq = next(n for n in proto.graph.node
              if n.op_type == "DequantizeLinear" and n.output[0].startswith(weight))
    w, scale = _initializer(proto, dq.input[0]), _initializer(proto, dq.input[1])
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * w.ndim
    shape[axis] = -1
    return w.astype(np.float64) * scale.reshape(shape)


def test_recorded_error_is_the_node_alone_computed_in_numpy():
    """fc1's error: its input, weight, bias and output quantized with the QDQ model's own
    parameters, against the exact fc1 + Relu, on the calibration data (numpy, float64)."""
    proto, x = _mlp(), _mlp_inputs()
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(x))(ir.serde.deserialize_model(proto))
    quantized = ir.serde.serialize_model(result.model)
    w1, b1 = _initializer(proto, "w1").astype(np.float64), _initializer(proto, "b1")
    exact = np.maximum(x @ w1.T + b1, 0)
    xq = _fake_quantize(x.astype(np.float64), *_q_params(quantized, "x"))
    bias_dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear"
                   and n.output[0] == "b1")
    bias = _initializer(quantized, bias_dq.input[0]) * _initializer(quantized, bias_dq.input[1])
    # the Relu is folded into fc1's uint8 output range (zero point 0: it clamps at 0)
    approx = _fake_quantize(xq @ _dequantized_weight(quantized, "w1").T + bias,
                            *_q_params(quantized, "hr"))
    expected = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    fc1 = _records(result)["fc1"]
    assert fc1.error == pytest.approx(expected, rel=1e-3)
    assert fc1.error_basis == "calibration"


def test_node_over_the_error_bound_stays_fp32_with_the_reason():
    proto, x = _mlp("weight"), _mlp_inputs()
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(x))(ir.serde.deserialize_model(proto))
    records = _records(result)
    fc1, fc2 = records["fc1"], records["fc2"]
    assert fc1.skipped is None and fc1.error < 0.05
    assert fc2.error > 0.05
    assert fc2.skipped == f"int8 error {fc2.error:.3g} > max_error 0.05"
    quantized = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(quantized, full_check=True)
    assert int8_nodes(quantized) == ["fc1"]
    # fc2 computes in fp32 on fc1's dequantized output: the model stays close to the original
    y_ref, y = _run(proto, {"x": x}), _run(quantized, {"x": x})
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 0.05

    # with the bound raised above fc2's error, fc2 is quantized too
    loose = QuantizeInt8Pass(QuantizeConfig(max_error=2 * fc2.error), Calibration(x))(
        ir.serde.deserialize_model(proto))
    assert {r.name for r in loose.changed} == {"fc1", "fc2"}


def test_int8_node_whose_output_makes_an_fp32_reader_err_goes_back_to_fp32():
    """fc2 stays fp32 for its error, but in fp32 it still reads fc1's int8 output, whose range
    the outlier unit sets: fc1 goes back to fp32 too, and says why."""
    proto, x = _mlp("activation"), _mlp_inputs()
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(x))(ir.serde.deserialize_model(proto))
    records = _records(result)
    fc1, fc2 = records["fc1"], records["fc2"]
    assert fc1.error < 0.05 < fc2.error
    assert fc2.skipped == f"int8 error {fc2.error:.3g} > max_error 0.05"
    reason = re.fullmatch(r"its quantized output costs fc2 \(fp32\) error (\S+) > max_error 0.05",
                          fc1.skipped)
    assert reason is not None and float(reason.group(1)) > 0.05
    assert not result.modified
    y_ref, y = _run(proto, {"x": x}), _run(result.model, {"x": x})
    np.testing.assert_array_equal(y, y_ref)


def _conv_net(group2: int = 1) -> onnx.ModelProto:
    """x [N,3,12,12] -> conv1 3x3 -> Relu -> MaxPool 2 -> conv2 3x3 (group ``group2``) -> Relu
    -> Flatten -> fc."""
    inits = {
        "w1": RNG.standard_normal((8, 3, 3, 3)) * 0.3, "b1": RNG.standard_normal(8) * 0.1,
        "w2": RNG.standard_normal((16, 8 // group2, 3, 3)) * 0.2,
        "b2": RNG.standard_normal(16) * 0.1,
        "wf": RNG.standard_normal((10, 16 * 6 * 6)) * 0.05, "bf": RNG.standard_normal(10) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                         group=group2),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _conv_inputs(n=64) -> np.ndarray:
    return RNG.random((n, 3, 12, 12), dtype=np.float32)


def test_custom_op_nodes_stay_fp32_and_the_rest_is_quantized(tmp_path):
    """conv1 becomes a DiffConv (domain ai.compressor); the grouped conv2 is left to int8."""
    proto, x = _conv_net(group2=2), _conv_inputs()
    diffconv = ReplaceConvWithDiffConvPass(DiffConvConfig())(ir.serde.deserialize_model(proto))
    assert {r.name for r in diffconv.changed} == {"conv1"}
    with_custom = ir.serde.serialize_model(diffconv.model)
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(x))(diffconv.model)
    records = _records(result)
    assert records["conv1"].skipped == ("custom op ai.compressor::DiffConv: onnxruntime cannot "
                                        "quantize it")
    assert records["conv2"].skipped is None and records["fc"].skipped is None
    quantized = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(quantized)
    listed = int8_nodes(quantized)
    assert "conv1" not in listed and {"conv2", "fc"} <= set(listed)
    assert set(listed) == _ort_int8_nodes(quantized, tmp_path)
    y_ref, y = _run(with_custom, {"x": x}), _run(quantized, {"x": x})
    assert np.mean(y.argmax(1) == y_ref.argmax(1)) >= 0.9
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 0.05


@pytest.mark.parametrize("excluded, int8", [
    ("conv2", {"conv1", "pool", "fc"}),
    # onnxruntime moves the QuantizeLinear of conv2's input above the MaxPool: it runs in int8
    ("conv1", {"pool", "conv2", "flatten", "fc"}),
])
def test_excluded_nodes_stay_fp32_and_int8_nodes_lists_exactly_the_quantized(
        excluded, int8, tmp_path):
    proto, x = _conv_net(), _conv_inputs()
    result = QuantizeInt8Pass(QuantizeConfig(exclude=(excluded,)), Calibration(x))(
        ir.serde.deserialize_model(proto))
    assert _records(result)[excluded].skipped == "excluded by the configuration"
    quantized = ir.serde.serialize_model(result.model)
    listed = int8_nodes(quantized)
    assert set(listed) == int8
    assert set(listed) == _ort_int8_nodes(quantized, tmp_path)
    assert {r.name for r in result.changed} == set(listed)


# --------------------------------------------------------------------------- timing, faked


class FakeLatency:
    """A latency table with deterministic times: fp32 candidates take ``fp32_ms``, int8
    candidates ``int8_ms[node]`` (node: the candidate's Conv/Gemm), whole models ``whole``."""

    def __init__(self, batch, int8_ms, fp32_ms=2.0, whole=None):
        self.context = LatencyContext(batch=batch)
        self.int8_ms, self.fp32_ms = int8_ms, fp32_ms
        self.whole = whole or {"fp32": 10.0, "chosen": 5.0, "all": 6.0}
        self.candidates: dict[tuple[str, str], onnx.ModelProto] = {}
        self.compared: list[str] = []

    def time(self, proto, signature=None):
        onnx.checker.check_model(proto, full_check=True)
        node = next(n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm"))
        precision = "int8" if any(n.op_type == "DequantizeLinear" for n in proto.graph.node) \
            else "fp32"
        self.candidates[node, precision] = proto
        return self.int8_ms[node] if precision == "int8" else self.fp32_ms

    def compare(self, models, feeds=None):
        self.compared = list(models)
        batch = next(iter(feeds.values())).shape[0]
        assert batch >= 1
        return {name: self.whole[name] for name in models}


def test_fake_latency_keeps_a_node_measured_slower_in_fp32_and_says_why():
    proto, x = _conv_net(), _conv_inputs()
    latency = FakeLatency(batch=8, int8_ms={"conv1": 1.0, "conv2": 5.0, "fc": 0.5})
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(x), latency)(
        ir.serde.deserialize_model(proto))
    records = _records(result)
    assert records["conv2"].skipped == "int8 measured slower: fp32 2 ms vs int8 5 ms at batch 8"
    assert records["conv1"].skipped is None
    assert records["conv1"].detail == "int8, fp32 2 ms vs int8 1 ms"
    assert records["fc"].detail == "int8, fp32 2 ms vs int8 0.5 ms"
    assert latency.compared == ["fp32", "chosen", "all"]
    assert "whole model at batch 8: fp32 10 ms, node by node 5 ms, all within max_error 6 ms" \
        in result.notes
    quantized = ir.serde.serialize_model(result.model)
    listed = int8_nodes(quantized)
    assert "conv2" not in listed and {"conv1", "fc"} <= set(listed)
    assert result.stats["batch"] == 8

    # the candidates: conv2 in int8 is DQ -> Conv -> Q on uint8 tensors at batch 8, in fp32
    # the Conv with the Relu that int8 folds into its output range; both run in onnxruntime
    int8_form = latency.candidates["conv2", "int8"]
    assert [n.op_type for n in int8_form.graph.node].count("DequantizeLinear") == 3
    assert [n.op_type for n in int8_form.graph.node][-2:] == ["Conv", "QuantizeLinear"]
    (value,) = int8_form.graph.input
    assert value.type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_value for d in value.type.tensor_type.shape.dim] == [8, 8, 6, 6]
    float_form = latency.candidates["conv2", "fp32"]
    assert [n.op_type for n in float_form.graph.node] == ["Conv", "Relu"]
    for form, dtype in ((int8_form, np.uint8), (float_form, np.float32)):
        out = runtime.session(form).run(None, {form.graph.input[0].name: np.ones((8, 8, 6, 6),
                                                                                 dtype)})[0]
        assert out.shape == (8, 16, 6, 6)


def test_fake_latency_whole_model_slower_keeps_fp32_and_faster_all_wins():
    proto, x = _conv_net(), _conv_inputs()
    slower = FakeLatency(batch=4, int8_ms={"conv1": 1.0, "conv2": 1.0, "fc": 1.0},
                         whole={"fp32": 3.0, "chosen": 4.0})
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(x), slower)(
        ir.serde.deserialize_model(proto))
    assert not result.modified and result.changed == []
    assert result.skipped[0].skipped == (
        "the quantized model as a whole measured slower: fp32 3 ms vs int8 4 ms at batch 4 "
        "(alone: fp32 2 ms vs int8 1 ms)")
    assert int8_nodes(ir.serde.serialize_model(result.model)) == []

    # conv2 is slower alone, but the whole model with it int8 is the fastest
    whole = FakeLatency(batch=4, int8_ms={"conv1": 1.0, "conv2": 3.0, "fc": 1.0},
                        whole={"fp32": 9.0, "chosen": 5.0, "all": 4.0})
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(x), whole)(
        ir.serde.deserialize_model(proto))
    conv2 = _records(result)["conv2"]
    assert conv2.skipped is None
    assert conv2.detail == ("int8, slower alone (fp32 2 ms vs int8 3 ms) but the whole model is "
                            "faster with it int8: 4 ms vs 5 ms")
    assert "conv2" in int8_nodes(ir.serde.serialize_model(result.model))


# --------------------------------------------------------------------------- inputs and options


def test_two_input_model_is_calibrated_on_both_inputs():
    w = RNG.standard_normal((10, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"], name="add"),
         helper.make_node("Gemm", ["s", "w"], ["y"], name="fc", transB=1)], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 16]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    feeds = {"a": RNG.standard_normal((128, 16)).astype(np.float32),
             "b": RNG.standard_normal((128, 16)).astype(np.float32) * 3}
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(feeds))(ir.serde.deserialize_model(proto))
    assert {r.name for r in result.changed} == {"add", "fc"}
    y_ref, y = _run(proto, feeds), _run(result.model, feeds)
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 0.05


def test_calibration_feeds_without_feeds_serves_one_input_only():
    class Arrays:
        inputs = np.zeros((5, 3), np.float32)
        batch_size = 2

    assert [f["x"].shape[0] for f in calibration_feeds(Arrays(), ["x"])] == [2, 2, 1]
    with pytest.raises(DataError, match="2 inputs"):
        list(calibration_feeds(Arrays(), ["a", "b"]))


def test_config_is_validated_and_errors_name_the_problem():
    assert repr(QuantizeInt8Pass(QuantizeConfig(max_error=0.1))) == (
        "QuantizeInt8Pass(max_error=0.1, min_speedup=1.0, calibration='minmax', "
        "activations='auto', reduce_range=None, exclude=())")
    with pytest.raises(OptionError, match="max_error"):
        QuantizeConfig(max_error=0)
    with pytest.raises(OptionError, match="calibration must be one of"):
        QuantizeConfig(calibration="mse")
    with pytest.raises(OptionError, match="activations"):
        QuantizeConfig(activations="int4")
    with pytest.raises(PassError, match="quantize: .*calibration data"):
        QuantizeInt8Pass(QuantizeConfig())(ir.serde.deserialize_model(_mlp()))
    with pytest.raises(PassError, match=re.escape("no node named fc9 to exclude")):
        QuantizeInt8Pass(QuantizeConfig(exclude=("fc9",)), Calibration(_mlp_inputs(8)))(
            ir.serde.deserialize_model(_mlp()))


def test_a_graph_output_written_by_gemm_stays_float():
    """The last Gemm computes in int8 (QGemm) but writes float logits: no clipping to the
    calibration range, no rounding to 256 levels."""
    proto, x = _conv_net(), _conv_inputs()
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(x))(ir.serde.deserialize_model(proto))
    quantized = ir.serde.serialize_model(result.model)
    (fc,) = [n for n in quantized.graph.node if n.name == "fc"]
    assert list(fc.output) == ["y"]
    assert "fc" in int8_nodes(quantized)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and "y" in
                   (*n.input, *n.output) for n in quantized.graph.node)
    y = _run(quantized, {"x": x})  # 640 logits: through a uint8 output, 256 values at most
    assert np.unique(y).size > 600


# --------------------------------------------------------------------------- evaluate, inspect


def test_evaluate_and_inspect_show_the_int8_nodes(tmp_path):
    import json

    from click.testing import CliRunner

    from compressor.cli import main
    from compressor.evaluate import EvaluationReport, evaluate
    from compressor.report import evaluation_table

    proto, x = _conv_net(), _conv_inputs()
    result = QuantizeInt8Pass(QuantizeConfig(), Calibration(x))(ir.serde.deserialize_model(proto))
    quantized = ir.serde.serialize_model(result.model)
    expected = int8_nodes(quantized)
    report = evaluate(quantized, reference=proto, batch_sizes=(1,), latency_runs=3,
                      progress=False)
    assert report.candidate.int8_nodes == expected and report.reference.int8_nodes == []
    assert EvaluationReport.from_dict(report.to_dict()).candidate.int8_nodes == expected
    table = evaluation_table(report)
    (row,) = [i for i, cell in enumerate(table.columns[0]._cells) if cell == "int8 nodes"]
    assert [column._cells[row] for column in table.columns[1:3]] == ["0", str(len(expected))]

    path = tmp_path / "int8.onnx"
    onnx.save(quantized, str(path))
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(path), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["int8_nodes"] == expected
    shown = runner.invoke(main, ["inspect", str(path)])
    assert f"int8 nodes ({len(expected)}): {', '.join(expected)}" in " ".join(shown.output.split())


def test_int8_candidate_quantizes_all_but_the_excluded_nodes(tmp_path):
    """The int8 form another pass times: the layer in int8 as onnxruntime fuses it
    (QLinearConv), the excluded neighbour left fp32, outputs close to the fp32 model's."""
    w = (RNG.standard_normal((8, 4, 3, 3)) / 6).astype(np.float32)
    w1 = (RNG.standard_normal((8, 8, 1, 1)) / 3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["z"], name="layer", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["z"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w1"], ["y"], name="context_after")],
        "candidate", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w1, "w1")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    x = RNG.standard_normal((2, 4, 9, 9)).astype(np.float32)
    quantized = int8_candidate(proto, {"x": x}, excluded=("context_after",))
    onnx.checker.check_model(quantized)
    assert _ort_int8_nodes(quantized, tmp_path) >= {"layer"}
    assert "context_after" not in _ort_int8_nodes(quantized, tmp_path)
    assert set(int8_nodes(quantized)) >= {"layer"} and "context_after" not in int8_nodes(quantized)
    y, y8 = _run(proto, {"x": x}), _run(quantized, {"x": x})
    assert np.linalg.norm(y8 - y) / np.linalg.norm(y) < 0.05
