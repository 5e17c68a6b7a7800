"""LSHConvPass: which Conv nodes it replaces and why it skips the others, chained channel
masks, calibration of K and L against the MAC ratio, the node's tables against the numpy
reference, and zoo models compressed with --method lsh-conv (valid ONNX, run with the
library)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import profile, runtime
from compressor.errors import OptionError
from compressor.passes.calibrate import Calibration
from compressor.passes.diffconv import ConvGeometry
from compressor.passes.lsh_conv import (
    OP_TYPE,
    LSHConvConfig,
    LSHConvPass,
    build_tables,
    plane_set,
    reference_lsh_conv,
    select_filters,
    sign_codes,
)


def conv_net(rng) -> onnx.ModelProto:
    """x [N,3,12,12] -> Conv 3x3 (24) -> Relu -> MaxPool 2 -> Conv 3x3 (32) -> Relu
    -> depthwise Conv (group 32) -> Flatten -> Gemm 10."""
    inits = dict(
        c1w=rng.standard_normal((24, 3, 3, 3)) * 0.3, c1b=rng.standard_normal(24) * 0.1,
        c2w=rng.standard_normal((32, 24, 3, 3)) * 0.1, c2b=rng.standard_normal(32) * 0.1,
        dww=rng.standard_normal((32, 1, 3, 3)) * 0.3,
        fw=rng.standard_normal((10, 32 * 6 * 6)) * 0.05, fb=rng.standard_normal(10) * 0.1,
    )
    nodes = [
        helper.make_node("Conv", ["x", "c1w", "c1b"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("MaxPool", ["ar"], ["ap"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["ap", "c2w", "c2b"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["br"], name="relu2"),
        helper.make_node("Conv", ["br", "dww"], ["d"], name="dw", pads=[1, 1, 1, 1], group=32),
        helper.make_node("Flatten", ["d"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def net():
    rng = np.random.default_rng(0)
    return conv_net(rng), np.maximum(rng.standard_normal((48, 3, 12, 12)), -0.5).astype(np.float32)


def compress(proto, x, **config):
    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(proto.SerializeToString()))
    defaults = dict(samples=24, trials=1, max_bits=6, max_tables=6)
    result = LSHConvPass(LSHConvConfig(**(defaults | config)), Calibration(x))(model)
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out)
    return result, out


def outputs(proto, x, names=None):
    session = runtime.session(proto)
    return session.run(names, {"x": x})


def nodes(proto, op_type):
    return [n for n in proto.graph.node if n.op_type == op_type]


def test_replaces_group_one_convs_and_says_why_it_skips_the_rest(net):
    proto, x = net
    result, out = compress(proto, x, ratio=0.5)
    replaced = nodes(out, OP_TYPE)
    assert [n.name for n in replaced] == ["conv1", "conv2"]
    assert all(n.domain == runtime.OP_DOMAIN for n in replaced)
    skipped = {r.name: r.skipped for r in result.layers if r.skipped}
    assert "group=32" in skipped["dw"]
    for record in result.changed:
        assert record.macs_after < record.macs_before
        assert "K=" in record.detail and "L=" in record.detail
        assert record.error is not None and record.error_basis.startswith("calibration")
    assert repr(LSHConvPass(LSHConvConfig(ratio=0.5))).startswith("LSHConvPass(ratio=0.5")


def test_chained_layers_share_the_selected_mask(net):
    proto, x = net
    result, out = compress(proto, x, ratio=0.5)
    conv1, conv2 = nodes(out, OP_TYPE)
    assert len(conv1.output) == 2 and conv1.output[1]  # selected filters exposed
    assert len(conv2.input) == 6 and conv2.input[5] == conv1.output[1]  # through Relu, MaxPool
    assert result.stats["chained"] == 1
    # The mask is exactly the zero channels: conv2 sees the same input with or without it.
    y, = outputs(out, x[:8])
    assert np.all(np.isfinite(y))


def test_ratio_one_keeps_the_model(net):
    proto, x = net
    _, out = compress(proto, x, ratio=1.0)
    (expected,), (y,) = outputs(proto, x[:8]), outputs(out, x[:8])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_expected_macs_follow_the_ratio(net):
    proto, x = net
    before = profile.profile_model(proto)
    _, out = compress(proto, x, ratio=0.5)
    after = profile.profile_model(out)
    conv_before = sum(layer.macs for layer in before.layers if layer.name in ("conv1", "conv2"))
    conv_after = sum(layer.macs for layer in after.layers if layer.op == OP_TYPE)
    assert 0 < conv_after <= 0.55 * conv_before
    for node in nodes(out, OP_TYPE):
        kept = [a.f for a in node.attribute if a.name == "expected_kept"]
        assert kept and 0 < kept[0] <= 0.55


def test_node_tables_match_the_reference(net):
    proto, x = net
    _, out = compress(proto, x, ratio=0.5, chain=False)
    node = nodes(out, OP_TYPE)[0]
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    w, planes, buckets, b = (inits[n] for n in (node.input[1], node.input[2], node.input[3], node.input[4]))
    probe = onnx.ModelProto.FromString(out.SerializeToString())
    probe.graph.output.append(helper.make_empty_tensor_value_info(node.output[0]))
    y = outputs(probe, x[:6])[-1]
    expected, selected = reference_lsh_conv(x[:6], w, b, planes, buckets, ConvGeometry(pads=(1, 1, 1, 1)))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    assert 0 < selected.mean() < 1


def test_fixed_bits_and_tables_are_used(net):
    proto, x = net
    result, out = compress(proto, x, ratio=0.6, bits=3, tables=2, query="columns")
    for node in nodes(out, OP_TYPE):
        planes = next(i for i in out.graph.initializer if i.name == node.input[2])
        assert list(planes.dims[:2]) == [2, 3]
        assert any(a.name == "query" and a.s == b"columns" for a in node.attribute)


def test_needs_calibration_data_and_checks_options():
    with pytest.raises(OptionError, match="needs calibration data"):
        LSHConvPass(LSHConvConfig()).requires(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10))
    with pytest.raises(OptionError, match="ratio"):
        LSHConvConfig(ratio=0)
    with pytest.raises(OptionError, match="lsh-bits"):
        LSHConvConfig(bits=17)
    with pytest.raises(OptionError, match="query"):
        LSHConvConfig(query="rows")


def test_tables_hold_every_filter_once_per_table():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((70, 4, 3, 3)).astype(np.float32)
    planes, buckets = build_tables(w, None, plane_set(0, 3, 4, 4 * 9 + 1 + 3))
    assert planes.shape == (3, 4, 37) and buckets.shape == (3, 16, 2)
    members = np.unpackbits(buckets.view(np.uint8), bitorder="little").reshape(3, 16, 128)[:, :, :70]
    np.testing.assert_array_equal(members.sum(axis=1), np.ones((3, 70)))
    codes = sign_codes(np.zeros((1, 1, 3, 4)))  # a zero projection is bit 0
    assert select_filters(codes, buckets, 70).sum() == members[np.arange(3), 0].any(axis=0).sum()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "vgg", "resnet20", "mobilenetv2"])
def test_zoo_models_stay_valid_and_run(name, compress_zoo):
    proto = compress_zoo(name, "lsh-conv", 0.5, 32)
    assert any(n.op_type == OP_TYPE for n in proto.graph.node)
    session = runtime.session(proto)
    y = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 1, 28, 28), np.float32)})[0]
    assert y.shape == (2, 10) and np.all(np.isfinite(y))
