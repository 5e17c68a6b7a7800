"""CleanupPass: BatchNormalization folding, constant folding, Identity and dead-node removal,
with outputs unchanged (onnxruntime before vs after)."""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compressor.io import export_to_onnx
from compressor.passes.base import PassManager
from compressor.passes.cleanup import CleanupConfig, CleanupPass
from compressor.runtime import session

RNG = np.random.default_rng(0)


def run(model: onnx.ModelProto | ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    sess = session(proto)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def cleanup(proto: onnx.ModelProto, config: CleanupConfig | None = None):
    """Run the pass on a copy of ``proto``; return the result and the cleaned proto."""
    result = CleanupPass(config)(ir.serde.deserialize_model(proto))
    cleaned = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(cleaned)
    return result, cleaned


def ops(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, shape) -> None:
    for batch in (1, 4):
        x = RNG.random((batch, *shape), dtype=np.float32)
        np.testing.assert_allclose(run(after, x), run(before, x), atol=1e-5, rtol=1e-5)


def tensor(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def batchnorm_inits(prefix: str, channels: int) -> list[onnx.TensorProto]:
    return [
        tensor(f"{prefix}.scale", RNG.uniform(0.5, 1.5, channels)),
        tensor(f"{prefix}.bias", RNG.uniform(-0.5, 0.5, channels)),
        tensor(f"{prefix}.mean", RNG.uniform(-0.5, 0.5, channels)),
        tensor(f"{prefix}.var", RNG.uniform(0.5, 2.0, channels)),
    ]


def bn_node(prefix: str, x: str, y: str) -> onnx.NodeProto:
    inputs = [x] + [f"{prefix}.{p}" for p in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix, epsilon=1e-3)


def make_model(nodes, initializers, input_shape=("N", 1, 6, 6), output_shape=None):
    graph = helper.make_graph(
        nodes,
        "hand_built",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return model


# ------------------------------------------------------------------- hand-built graphs


def conv_bn_relu(weights_as_constant_node: bool = False) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu, built by hand as the task's reference case."""
    weight = RNG.standard_normal((4, 1, 3, 3))
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c"], name="conv1"),
        bn_node("bn1", "c", "b"),
        helper.make_node("Relu", ["b"], ["y"], name="relu1"),
    ]
    inits = [tensor("conv1.bias", RNG.standard_normal(4)), *batchnorm_inits("bn1", 4)]
    if weights_as_constant_node:
        # Weights in a Constant node, reaching BN's mean through an Identity: both must be
        # normalised away before the fusion rule can see constants.
        nodes.insert(
            0,
            helper.make_node(
                "Constant", [], ["conv1.weight"], value=tensor("w", weight), name="weight"
            ),
        )
        nodes.insert(0, helper.make_node("Identity", ["bn1.mean_raw"], ["bn1.mean"]))
        for init in inits:
            if init.name == "bn1.mean":
                init.name = "bn1.mean_raw"
    else:
        inits.append(tensor("conv1.weight", weight))
    return make_model(nodes, inits, output_shape=["N", 4, 4, 4])


@pytest.mark.parametrize("weights_as_constant_node", [False, True])
def test_hand_built_conv_bn_relu_is_folded(weights_as_constant_node):
    proto = conv_bn_relu(weights_as_constant_node)
    onnx.checker.check_model(proto)
    result, cleaned = cleanup(proto)
    assert ops(cleaned) == ["Conv", "Relu"]
    assert [n.name for n in cleaned.graph.node] == ["conv1", "relu1"]
    conv = cleaned.graph.node[0]
    initializer_names = {init.name for init in cleaned.graph.initializer}
    assert conv.input[1] in initializer_names and conv.input[2] in initializer_names
    assert_same_outputs(proto, cleaned, (1, 6, 6))
    assert result.modified
    assert result.stats["batchnorm_folded"] == 1
    assert result.stats["batchnorm_kept"] == 0
    assert result.stats["nodes_after"] == 2
    (record,) = result.layers
    assert (record.name, record.op, record.detail) == (
        "bn1",
        "BatchNormalization",
        "folded into conv1",
    )
    assert record.skipped is None and record.params_before == 16 and record.params_after == 0
    assert result.notes == []


def test_conv_without_bias_and_gemm_without_transpose():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),  # no bias input
        bn_node("bn_c", "c", "b"),
        helper.make_node("Flatten", ["b"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "g", "gb"], ["m"], name="gemm", alpha=0.5, beta=2.0),
        bn_node("bn_g", "m", "y"),
    ]
    inits = [
        tensor("w", RNG.standard_normal((3, 1, 3, 3))),
        tensor("g", RNG.standard_normal((3 * 4 * 4, 5))),
        tensor("gb", RNG.standard_normal(5)),
        *batchnorm_inits("bn_c", 3),
        *batchnorm_inits("bn_g", 5),
    ]
    proto = make_model(nodes, inits, output_shape=["N", 5])
    result, cleaned = cleanup(proto)
    assert "BatchNormalization" not in ops(cleaned)
    assert {r.detail for r in result.layers} == {"folded into conv", "folded into gemm"}
    assert_same_outputs(proto, cleaned, (1, 6, 6))


def test_batchnorm_that_cannot_be_folded_stays_with_a_reason():
    nodes = [
        bn_node("bn_in", "x", "a"),  # on the graph input
        helper.make_node("Conv", ["a", "w"], ["c"], name="conv"),
        bn_node("bn_shared", "c", "b"),  # the Conv output is also read by the Add
        helper.make_node("Add", ["b", "c"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        bn_node("bn_relu", "r", "y"),  # after a Relu
    ]
    inits = [
        tensor("w", RNG.standard_normal((1, 1, 3, 3))),
        *batchnorm_inits("bn_in", 1),
        *batchnorm_inits("bn_shared", 1),
        *batchnorm_inits("bn_relu", 1),
    ]
    proto = make_model(nodes, inits, output_shape=["N", 1, 4, 4])
    result, cleaned = cleanup(proto)
    assert ops(cleaned).count("BatchNormalization") == 3
    reasons = {record.name: record.skipped for record in result.layers}
    assert "graph input" in reasons["bn_in"]
    assert "also used elsewhere" in reasons["bn_shared"]
    assert "Relu 'relu'" in reasons["bn_relu"]
    assert result.stats["batchnorm_folded"] == 0 and result.stats["batchnorm_kept"] == 3
    assert len(result.notes) == 3
    assert all(note.startswith("BatchNormalization '") for note in result.notes)
    assert_same_outputs(proto, cleaned, (1, 6, 6))


def test_fold_batchnorm_off_keeps_it():
    proto = conv_bn_relu()
    result, cleaned = cleanup(proto, CleanupConfig(fold_batchnorm=False))
    assert ops(cleaned) == ["Conv", "BatchNormalization", "Relu"]
    assert result.layers == [] and result.stats["batchnorm_folded"] == 0


def test_constants_are_folded_and_lifted():
    nodes = [
        helper.make_node("Constant", [], ["a"], value=tensor("a", [[1.0, 2.0, 3.0]])),
        helper.make_node("Constant", [], ["b"], value=tensor("b", [[0.5, 0.5, 0.5]])),
        helper.make_node("Add", ["a", "b"], ["ab"], name="add_constants"),
        # Per-sample dims are static even with a dynamic batch: this chain folds too.
        helper.make_node("Shape", ["x"], ["width"], name="shape", start=1),
        helper.make_node("Cast", ["width"], ["width_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "ab"], ["m"], name="mul"),
        helper.make_node("Mul", ["m", "width_f"], ["y"], name="scale"),
    ]
    proto = make_model(nodes, [], input_shape=("N", 3), output_shape=["N", 3])
    result, cleaned = cleanup(proto)
    assert ops(cleaned) == ["Mul", "Mul"]
    folded = {i.name: numpy_helper.to_array(i) for i in cleaned.graph.initializer}
    assert any(np.array_equal(v, [[1.5, 2.5, 3.5]]) for v in folded.values())
    assert result.stats["constants_folded"] + result.stats["dead_removed"] == 5
    x = RNG.random((2, 3), dtype=np.float32)
    np.testing.assert_allclose(run(cleaned, x), x * [1.5, 2.5, 3.5] * 3, rtol=1e-6)
    _, kept = cleanup(proto, CleanupConfig(fold_constants=False))
    assert "Add" in ops(kept) and "Constant" not in ops(kept)  # lifted, not folded


def test_identity_and_dead_nodes_are_removed():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["i"], name="identity"),
        helper.make_node("Sigmoid", ["x"], ["unused"], name="dead_sigmoid"),
        helper.make_node("Neg", ["unused"], ["unused2"], name="dead_neg"),
        helper.make_node("Abs", ["i"], ["y"], name="abs"),
    ]
    proto = make_model(nodes, [], input_shape=("N", 3), output_shape=["N", 3])
    result, cleaned = cleanup(proto)
    assert ops(cleaned) == ["Relu", "Abs"]
    assert result.stats["identity_removed"] == 1 and result.stats["dead_removed"] == 2
    assert result.stats["nodes_before"] == 5 and result.stats["nodes_after"] == 2
    _, kept = cleanup(proto, CleanupConfig(remove_dead=False))
    assert "Sigmoid" in ops(kept) and "Neg" in ops(kept) and "Identity" not in ops(kept)
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(run(cleaned, x), np.abs(np.maximum(x, 0)))


def test_output_is_topologically_sorted():
    nodes = [
        helper.make_node("Abs", ["r"], ["y"], name="abs"),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
    ]
    proto = make_model(nodes, [], input_shape=("N", 3), output_shape=["N", 3])
    result = CleanupPass()(ir.serde.deserialize_model(proto))
    cleaned = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(cleaned)
    assert ops(cleaned) == ["Relu", "Abs"]


def test_repr_and_frozen_config():
    assert repr(CleanupPass()) == (
        "CleanupPass(fold_batchnorm=True, fold_constants=True, fold_pads=True, remove_dead=True)"
    )
    assert repr(CleanupPass(CleanupConfig(remove_dead=False))) == (
        "CleanupPass(fold_batchnorm=True, fold_constants=True, fold_pads=True, "
        "remove_dead=False)"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        CleanupConfig().fold_batchnorm = False  # type: ignore[misc]
    assert CleanupPass.name == "cleanup"


def test_runs_in_a_pass_manager():
    model, results = PassManager([CleanupPass()])(ir.serde.deserialize_model(conv_bn_relu()))
    assert results[0].stats["batchnorm_folded"] == 1
    assert [node.op_type for node in model.graph] == ["Conv", "Relu"]


# ------------------------------------------------------------------------ torch exports


class BatchNormNet(nn.Module):
    """Every place a BatchNormalization can follow a foldable node."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)
        self.bn2 = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 3, 3)
        self.bn3 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 6 * 6, 10)
        self.bn4 = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv(x)))
        x = self.bn3(self.up(self.bn2(self.depthwise(x))))
        return self.bn4(self.fc(x.flatten(1)))


@pytest.fixture(scope="module")
def trained_net() -> BatchNormNet:
    """A BatchNormNet whose BN statistics moved in train mode, then switched to eval."""
    torch.manual_seed(0)
    net = BatchNormNet().train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.rand(16, 1, 8, 8) * 3 + 1)
    return net.eval()


def test_legacy_torch_export_keeps_batchnorm_and_the_pass_folds_it(trained_net):
    proto = legacy_export(trained_net, (1, 8, 8))
    assert ops(proto).count("BatchNormalization") == 4
    names_before = {n.name for n in proto.graph.node if n.op_type != "BatchNormalization"}
    result, cleaned = cleanup(proto)
    assert "BatchNormalization" not in ops(cleaned)
    assert result.stats["batchnorm_folded"] == 4
    assert {r.detail.split()[-1] for r in result.layers} <= names_before
    assert {n.name for n in cleaned.graph.node} <= names_before  # fused nodes keep names
    assert_same_outputs(proto, cleaned, (1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        expected = trained_net(x).numpy()
    np.testing.assert_allclose(run(cleaned, x.numpy()), expected, atol=1e-4, rtol=1e-4)


def test_dynamo_export_is_kept_equivalent(trained_net):
    proto = export_to_onnx(trained_net, (1, 8, 8))
    result, cleaned = cleanup(proto)
    assert "BatchNormalization" not in ops(cleaned)
    assert result.stats["nodes_after"] <= result.stats["nodes_before"]
    assert cleaned.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch stays dynamic
    assert_same_outputs(proto, cleaned, (1, 8, 8))


def legacy_export(module: nn.Module, input_shape) -> onnx.ModelProto:
    """The TorchScript-based exporter without its own folding: BatchNormalization stays."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.rand(2, *input_shape),),
            buffer,
            dynamo=False,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=18,
        )
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_zoo_models_with_residuals_and_depthwise_convs(name):
    zoo = pytest.importorskip("compressor.models.zoo")
    entry = zoo.get(name)
    torch.manual_seed(0)
    module = entry.build().train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.rand(8, *entry.input_shape))
    module.eval()
    proto = legacy_export(module, entry.input_shape)
    batchnorms = ops(proto).count("BatchNormalization")
    assert batchnorms > 0
    result, cleaned = cleanup(proto)
    assert "BatchNormalization" not in ops(cleaned) and "Identity" not in ops(cleaned)
    assert result.stats["batchnorm_folded"] == batchnorms
    assert_same_outputs(proto, cleaned, entry.input_shape)
