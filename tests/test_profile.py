"""profile_model: MACs against hand-computed counts, parameters counted once, shape errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import UnsupportedModelError
from compressor.profile import (
    MAC_COUNTERS,
    _load_custom_op_counters,
    profile_model,
    register_mac_counter,
    static_shapes,
)

RNG = np.random.default_rng(0)


def make_model(nodes, input_shape, initializers, *, opsets=(("", 18),), input_name="x"):
    """A one-input model; the output is the last node's first output, shape left to inference."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(domain, v) for domain, v in opsets]
    )
    model.ir_version = 10
    return model


def weights(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def single_layer(node, input_shape, **inits):
    return profile_model(make_model([node], input_shape, inits)).layers[0]


def test_conv_with_stride_and_padding():
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1])
    layer = single_layer(node, ["N", 3, 32, 32], w=weights(16, 3, 3, 3), b=weights(16))
    assert layer.output_shape == (1, 16, 16, 16)
    assert layer.macs == 16 * 16 * 16 * (3 * 3 * 3)
    assert layer.params == 16 * 3 * 3 * 3 + 16
    assert layer.weight_shape == (16, 3, 3, 3)


def test_conv_without_padding_shrinks_output():
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[5, 3])
    layer = single_layer(node, [1, 2, 10, 10], w=weights(4, 2, 5, 3))
    assert layer.output_shape == (1, 4, 6, 8)
    assert layer.macs == 4 * 6 * 8 * (2 * 5 * 3)


def test_grouped_conv():
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=2, pads=[1, 1, 1, 1])
    layer = single_layer(node, [1, 4, 8, 8], w=weights(8, 2, 3, 3))
    # each output channel sees in_channels / groups = 2 input channels
    assert layer.macs == 8 * 8 * 8 * (2 * 3 * 3)


def test_depthwise_conv():
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=6, strides=[2, 2], pads=[1, 1, 1, 1])
    layer = single_layer(node, [1, 6, 16, 16], w=weights(6, 1, 3, 3))
    assert layer.output_shape == (1, 6, 8, 8)
    assert layer.macs == 6 * 8 * 8 * 9


def test_conv_transpose():
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])
    layer = single_layer(node, [1, 4, 5, 5], w=weights(4, 6, 3, 3))
    assert layer.output_shape == (1, 6, 11, 11)
    # every input element is scattered through out_channels x kernel weights
    assert layer.macs == 4 * 5 * 5 * (6 * 3 * 3)


def test_grouped_conv_transpose():
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=2)
    layer = single_layer(node, [1, 4, 5, 5], w=weights(4, 3, 3, 3))
    assert layer.output_shape == (1, 6, 7, 7)
    assert layer.macs == 4 * 5 * 5 * (3 * 3 * 3)


def test_gemm_trans_b_and_bias():
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    layer = single_layer(node, ["N", 20], w=weights(30, 20), b=weights(30))
    assert layer.macs == 20 * 30
    assert layer.params == 30 * 20 + 30


def test_gemm_trans_a():
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)
    layer = single_layer(node, [20, 1], w=weights(20, 30))
    assert layer.output_shape == (1, 30)
    assert layer.macs == 20 * 30


def test_matmul_with_leading_dims():
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    layer = single_layer(node, ["N", 5, 20], w=weights(20, 30))
    assert layer.output_shape == (1, 5, 30)
    assert layer.macs == 5 * 20 * 30


def test_elementwise_ops_have_no_macs():
    node = helper.make_node("Relu", ["x"], ["y"])
    profile = profile_model(make_model([node], [1, 8], {}))
    assert profile.macs == 0 and profile.params == 0
    assert profile.ops == {"Relu": 1}


def test_shared_initializer_counts_once():
    w = weights(8, 8)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="second"),
    ]
    profile = profile_model(make_model(nodes, ["N", 8], {"w": w}))
    assert profile.params == 64
    assert profile.layer("first").params == 64
    assert profile.layer("second").params == 0
    assert profile.layer("second").weight_shape == (8, 8)
    assert profile.macs == 2 * 64


def test_shape_tensors_are_not_params_but_gather_tables_are():
    nodes = [
        helper.make_node("Gather", ["table", "x"], ["e"], name="embed"),
        helper.make_node("Reshape", ["e", "shape"], ["y"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(weights(100, 16), "table"),
            numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    profile = profile_model(model)
    assert profile.params == 100 * 16
    assert profile.layer("embed").weight_shape == (100, 16)
    assert profile.layer("flatten").params == 0


def test_constant_node_weights_are_params():
    w = weights(4, 8)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    profile = profile_model(make_model(nodes, [1, 3, 4], {}))
    assert profile.params == 32
    assert profile.macs == 3 * 4 * 8
    assert [layer.op for layer in profile.layers] == ["MatMul"]


def test_symbolic_non_batch_dimension_raises():
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = make_model([node], ["N", "seq", 20], {"w": weights(20, 30)})
    with pytest.raises(UnsupportedModelError, match="symbolic dimension 1 \\('seq'\\)"):
        profile_model(model)


def test_input_without_shape_raises():
    node = helper.make_node("Relu", ["x"], ["y"])
    model = make_model([node], None, {})
    with pytest.raises(UnsupportedModelError, match="no static shape"):
        profile_model(model)


def test_symbolic_batch_is_set_to_one():
    node = helper.make_node("Relu", ["x"], ["y"])
    shapes, input_shape = static_shapes(make_model([node], ["batch", 3, 4], {}), batch=5)
    assert input_shape == (5, 3, 4)
    assert shapes["y"] == (5, 3, 4)


def test_custom_counter_sees_shapes_and_weights(monkeypatch):
    # our custom ops register their counters on first import: do it now, so they land in the
    # real table and not in the copy patched in for this test (later tests need them)
    _load_custom_op_counters()
    monkeypatch.setattr("compressor.profile.MAC_COUNTERS", dict(MAC_COUNTERS))

    @register_mac_counter("Scale", domain="test.domain")
    def count(node, shapes, inits):
        return int(inits[node.input[1]].sum()) + shapes[node.input[0]][1]

    node = helper.make_node("Scale", ["x", "s"], ["y"], domain="test.domain")
    model = make_model(
        [node],
        [1, 7],
        {"s": np.array([2.0, 3.0], dtype=np.float32)},
        opsets=(("", 18), ("test.domain", 1)),
    )
    assert profile_model(model).macs == 5 + 7


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torch_exported_cnn_matches_hand_count():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 4 x 8 x 8 outputs, 9 MACs each
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise: 9 MACs per output
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    ).eval()
    program = torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), dynamo=True, verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    profile = profile_model(proto)
    assert profile.macs == 4 * 64 * 9 + 4 * 64 * 9 + 256 * 10
    assert profile.params == sum(p.numel() for p in model.parameters())


def test_custom_op_macs_and_shapes_after_it():
    """ONNX shape inference knows nothing of our ops; the profile runs the model to get the
    shapes after them, and counts their MACs with the registered counter."""
    from compressor import runtime
    from compressor.errors import RuntimeLibraryError

    try:
        runtime.library_path()
    except RuntimeLibraryError:
        pytest.skip("custom-op library not built")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((10, 8 * 6 * 6)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("DiffConv", ["x", "w"], ["c"], domain=runtime.OP_DOMAIN,
                             name="dc", pads=[1, 1, 1, 1], threshold=0.0),
            helper.make_node("Flatten", ["c"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(runtime.OP_DOMAIN, 1)])
    model.ir_version = 10
    profile = profile_model(model)
    layers = {layer.name: layer for layer in profile.layers}
    assert layers["dc"].macs == 8 * 6 * 6 * 3 * 3 * 3
    assert layers["fc"].macs == 10 * 8 * 6 * 6
