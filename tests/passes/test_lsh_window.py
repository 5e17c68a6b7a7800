"""LSHWindowConvPass: which Conv nodes it replaces and why it skips the others, K calibrated
against the MAC ratio (hashing included), the node against the numpy reference, and zoo
models compressed with --method lsh-window (valid ONNX, run with the library)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime
from compressor.errors import OptionError
from compressor.passes.calibrate import Calibration
from compressor.passes.diffconv import ConvGeometry
from compressor.passes.lsh_window import (
    OP_TYPE,
    LSHWindowConfig,
    LSHWindowConvPass,
    first_occurrence_buckets,
    reference_lsh_window_conv,
)


def conv_net(rng) -> onnx.ModelProto:
    """x [N,4,12,12] -> Conv 3x3 (48, pad 1) -> Relu -> depthwise Conv (group 48) -> Flatten
    -> Gemm 10. Inputs have a zero background, like the zoo's images."""
    inits = dict(
        c1w=rng.standard_normal((48, 4, 3, 3)) * 0.3, c1b=rng.standard_normal(48) * 0.1,
        dww=rng.standard_normal((48, 1, 3, 3)) * 0.3,
        fw=rng.standard_normal((10, 48 * 12 * 12)) * 0.02, fb=rng.standard_normal(10) * 0.1,
    )
    nodes = [
        helper.make_node("Conv", ["x", "c1w", "c1b"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("Conv", ["ar", "dww"], ["d"], name="dw", pads=[1, 1, 1, 1], group=48),
        helper.make_node("Flatten", ["d"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.fixture
def net():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((32, 4, 12, 12)), 0).astype(np.float32)
    x[:, :, :4, :] = 0  # zero background
    return conv_net(rng), x


def compress(proto, x, **config):
    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(proto.SerializeToString()))
    defaults = dict(samples=16, trials=1, max_bits=16)
    result = LSHWindowConvPass(LSHWindowConfig(**(defaults | config)), Calibration(x))(model)
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out)
    return result, out


def run(proto, x):
    session = runtime.session(proto)
    return session.run(None, {"x": x})[0]


def test_replaces_group_one_convs_within_the_ratio(net):
    proto, x = net
    result, out = compress(proto, x, ratio=0.7)
    replaced = [n for n in out.graph.node if n.op_type == OP_TYPE]
    assert [n.name for n in replaced] == ["conv1"]
    skipped = {r.name: r.skipped for r in result.layers if r.skipped}
    assert "group=48" in skipped["dw"]
    (record,) = result.changed
    assert record.macs_after <= 0.7 * record.macs_before
    assert "K=" in record.detail and "hashing" in record.detail
    y, expected = run(out, x[:8]), run(proto, x[:8])
    assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < 0.9  # noise inputs group poorly


def test_too_small_a_ratio_leaves_the_layer_with_the_reason(net):
    proto, x = net
    result, out = compress(proto, x, ratio=0.02)
    assert not any(n.op_type == OP_TYPE for n in out.graph.node)
    (record,) = [r for r in result.layers if r.name == "conv1"]
    assert "no K keeps" in record.skipped and "hashing" in record.skipped


def test_node_matches_the_reference(net):
    proto, x = net
    _, out = compress(proto, x, ratio=0.8)
    node = next(n for n in out.graph.node if n.op_type == OP_TYPE)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    w, planes, b = (inits[n] for n in node.input[1:4])
    probe = onnx.ModelProto.FromString(out.SerializeToString())
    probe.graph.output.append(helper.make_empty_tensor_value_info(node.output[0]))
    session = runtime.session(probe)
    y = session.run([node.output[0]], {"x": x[:4]})[0]
    expected, buckets = reference_lsh_window_conv(x[:4], w, b, planes, ConvGeometry(pads=(1, 1, 1, 1)))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    assert buckets.max() + 1 < 144  # windows were grouped


def test_first_occurrence_numbering():
    np.testing.assert_array_equal(first_occurrence_buckets(np.array([7, 3, 7, 9, 3])), [0, 1, 0, 2, 1])


def test_needs_calibration_data_and_checks_options():
    with pytest.raises(OptionError, match="needs calibration data"):
        LSHWindowConvPass(LSHWindowConfig()).requires(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10))
    with pytest.raises(OptionError, match="lsh-bits"):
        LSHWindowConfig(bits=33)
    with pytest.raises(OptionError, match="ratio"):
        LSHWindowConfig(ratio=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "vgg", "resnet20", "mobilenetv2"])
def test_zoo_models_stay_valid_and_run(name, compress_zoo):
    proto = compress_zoo(name, "lsh-window", 0.75, 16)
    session = runtime.session(proto)
    y = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 1, 28, 28), np.float32)})[0]
    assert y.shape == (2, 10) and np.all(np.isfinite(y))
