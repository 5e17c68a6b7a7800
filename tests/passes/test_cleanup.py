"""CleanupPass: BatchNormalization folding, constant folding, Identity and dead-node removal,
with outputs unchanged (onnxruntime before vs after)."""

from __future__ import annotations

import dataclasses
import io
import math
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F

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


# -------------------------------------------- shape folding: TF-style SAME padding (timm)


def same_padding(size, kernel: int, stride: int, dilation: int):
    """timm's ``get_same_padding``: on ints, or on the tensors the TorchScript tracer hands
    out for ``x.size()``, so the pads are computed in the graph at run time."""
    if isinstance(size, torch.Tensor):
        return torch.clamp(
            ((size / stride).ceil() - 1) * stride + (kernel - 1) * dilation + 1 - size, min=0
        )
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: TF 'SAME' padding computed from ``x.shape`` in forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        pad_h = same_padding(ih, kh, sh, dh)
        pad_w = same_padding(iw, kw, sw, dw)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def expected_pads(conv: Conv2dSame, height: int, width: int) -> list[int]:
    """ONNX Conv pads (top, left, bottom, right) for ``conv`` on a height x width input."""
    pad_h = same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
    pad_w = same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
    return [pad_h // 2, pad_w // 2, pad_h - pad_h // 2, pad_w - pad_w // 2]


class SamePaddingNet(nn.Module):
    """Stride 2 and 1, k 3 and 5, a depthwise conv, odd and even heights and widths
    (23 x 22 in, 12 x 11 after the first conv)."""

    def __init__(self):
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = Conv2dSame(8, 8, 5, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv = Conv2dSame(8, 16, 3)
        self.down = Conv2dSame(16, 16, 5, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.stem(x)))
        x = F.relu6(self.bn2(self.depthwise(x)))
        return self.down(F.relu6(self.conv(x)))

    def same_convs(self) -> list[Conv2dSame]:
        return [self.stem, self.depthwise, self.conv, self.down]


SAME_SHAPE = (3, 23, 22)


def export(module: nn.Module, shape, *, dynamo: bool, batch: int | None) -> onnx.ModelProto:
    """``torch.onnx.export`` as users call it; ``batch`` None: a dynamic batch axis."""
    example = (torch.rand(batch or 2, *shape),)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            dynamic = None if batch else ({0: torch.export.Dim("batch", min=1)},)
            program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dynamic,
                                        input_names=["input"], verbose=False)
            proto = program.model_proto
        else:
            axes = None if batch else {"input": {0: "batch"}, "output": {0: "batch"}}
            torch.onnx.export(module, example, buffer, dynamo=False, opset_version=18,
                              input_names=["input"], output_names=["output"], dynamic_axes=axes)
            proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = min(proto.ir_version, 10)
    return proto


@pytest.fixture(scope="module")
def same_padding_net() -> SamePaddingNet:
    torch.manual_seed(0)
    net = SamePaddingNet().train()
    with torch.no_grad():
        net(torch.rand(8, *SAME_SHAPE))  # move the BatchNorm statistics
    return net.eval()


@pytest.mark.parametrize(
    ("dynamo", "batch"),
    [(False, None), (False, 1), (False, 3), (True, None), (True, 3)],
    ids=["torchscript-dynamic", "torchscript-static1", "torchscript-static3", "dynamo-dynamic",
         "dynamo-static3"],
)
def test_same_padding_from_the_shape_folds_into_the_convs(same_padding_net, dynamo, batch):
    proto = export(same_padding_net, SAME_SHAPE, dynamo=dynamo, batch=batch)
    if not dynamo:  # the TorchScript exporter computes every pad at run time
        assert ops(proto).count("Pad") == 4 and "Shape" in ops(proto)
    result, cleaned = cleanup(proto)
    assert "Shape" not in ops(cleaned) and "Pad" not in ops(cleaned)
    assert ops(cleaned) == ["Conv", "Clip", "Conv", "Clip", "Conv", "Clip", "Conv"]
    # the Convs' pads are TF's SAME padding, asymmetric where the sizes call for it
    sizes = [(23, 22), (12, 11), (12, 11), (12, 11)]
    convs = same_padding_net.same_convs()
    want = [expected_pads(conv, *hw) for conv, hw in zip(convs, sizes, strict=True)]
    assert want[0] == [1, 0, 1, 1] and want[3] == [1, 2, 2, 2]  # asymmetric both ways
    got = [list(helper.get_attribute_value(a)) for n in cleaned.graph.node
           if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
    assert got == want
    if not dynamo:
        assert result.stats["pads_folded"] == 4 and result.stats["pads_kept"] == 0
        assert result.stats["shape_nodes_folded"] > 40
        assert all(r.detail.startswith("folded into") for r in result.layers if r.op == "Pad")
    dims = cleaned.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].HasField("dim_param") == (batch is None)  # a dynamic batch stays dynamic
    for n in (1, 3) if batch is None else (batch,):
        x = RNG.random((n, *SAME_SHAPE), dtype=np.float32)
        np.testing.assert_allclose(run(cleaned, x), run(proto, x), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            expected = same_padding_net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(run(cleaned, x), expected, atol=1e-4, rtol=1e-4)


class FlattenNet(nn.Module):
    """``x.view(x.size(0), -1)``: a shape computation that needs the batch dimension."""

    def __init__(self):
        super().__init__()
        self.conv = Conv2dSame(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 12 * 11, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


def test_what_reads_the_dynamic_batch_stays_and_says_so():
    torch.manual_seed(0)
    net = FlattenNet().eval()
    proto = export(net, SAME_SHAPE, dynamo=False, batch=None)
    result, cleaned = cleanup(proto)
    assert "Pad" not in ops(cleaned) and ops(cleaned).count("Shape") == 1
    assert result.stats["shape_nodes_kept"] == 1
    (note,) = [n for n in result.notes if n.startswith("Shape")]
    assert note.endswith("it reads dimension 0 of '/conv/Conv_output_0', which is dynamic")
    for n in (1, 3):  # the batch was not baked in
        x = RNG.random((n, *SAME_SHAPE), dtype=np.float32)
        np.testing.assert_allclose(run(cleaned, x), run(proto, x), atol=1e-5, rtol=1e-5)


def test_partly_known_shapes_fold_through_arithmetic_slice_and_gather():
    """Shape of N x 3 x 6 x 6 -> Mul -> Slice [1:] -> ReduceProd, and a scalar-index Gather of
    the channels: the static part folds, the batch (Gather 0 -> Concat -> Reshape) stays."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Mul", ["shape", "ones"], ["scaled"], name="mul"),  # [?, 3, 6, 6]
        helper.make_node("Slice", ["scaled", "one_vec", "four_vec"], ["chw"], name="slice"),
        helper.make_node("ReduceProd", ["chw"], ["area"], name="area", keepdims=1),
        helper.make_node("Gather", ["shape", "zero"], ["n"], name="gather_batch", axis=0),
        helper.make_node("Gather", ["scaled", "one"], ["c"], name="gather_channels", axis=0),
        helper.make_node("Unsqueeze", ["n", "zero_vec"], ["n_vec"], name="unsqueeze"),
        helper.make_node("Concat", ["n_vec", "area"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
        helper.make_node("Cast", ["c"], ["c_float"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Div", ["flat", "c_float"], ["y"], name="div"),
    ]
    inits = [
        numpy_helper.from_array(np.array(v, dtype=np.int64), name)
        for name, v in [("ones", [1, 1, 1, 1]), ("one_vec", [1]), ("four_vec", [4]),
                        ("zero", 0), ("one", 1), ("zero_vec", [0])]
    ]
    proto = make_model(nodes, inits, input_shape=("N", 3, 6, 6), output_shape=["N", 108])
    result, cleaned = cleanup(proto)
    assert ops(cleaned) == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Div"]
    assert result.stats["shape_values_folded"] == 2  # area (into Concat), c_float (into Div)
    assert result.stats["shape_nodes_folded"] == 5  # Mul, Slice, ReduceProd, Gather, Cast
    assert result.notes == ["Shape 'shape' kept: it reads dimension 0 of 'x', which is dynamic"]
    folded = {i.name: numpy_helper.to_array(i) for i in cleaned.graph.initializer}
    concat, div = (n for n in cleaned.graph.node if n.op_type in ("Concat", "Div"))
    np.testing.assert_array_equal(folded[concat.input[1]], [108])
    assert folded[div.input[1]] == np.float32(3)
    for batch in (1, 3):
        x = RNG.random((batch, 3, 6, 6), dtype=np.float32)
        np.testing.assert_allclose(run(cleaned, x), x.reshape(batch, 108) / 3, rtol=1e-6)


# ------------------------------------------------------------- Pads that stay, with why


def pad_node(name: str, x: str, y: str, mode: str = "constant", value: str = ""):
    inputs = [x, f"{name}.pads"] + ([value] if value else [])
    return helper.make_node("Pad", inputs, [y], name=name, mode=mode)


def test_pads_that_cannot_fold_stay_with_the_reason():
    weight = RNG.standard_normal((2, 2, 3, 3))
    pads = {  # asymmetric everywhere: (top, left) then (bottom, right), N and C unpadded
        "reflect": [0, 0, 1, 0, 0, 0, 0, 1],
        "shared": [0, 0, 0, 1, 0, 0, 1, 1],
        "minus_inf": [0, 0, 1, 1, 0, 0, 0, 0],
        "auto": [0, 0, 1, 0, 0, 0, 1, 1],
        "channels": [0, 1, 0, 0, 0, 0, 0, 0],
        "twice": [0, 0, 2, 1, 0, 0, 1, 0],
    }
    nodes = [
        pad_node("reflect", "x", "p1", mode="reflect"),
        helper.make_node("Conv", ["p1", "w"], ["c1"], name="conv_reflect"),
        pad_node("shared", "c1", "p2"),
        helper.make_node("Conv", ["p2", "w"], ["c2"], name="conv_shared"),
        helper.make_node("MaxPool", ["p2"], ["m2"], name="pool_shared", kernel_shape=[3, 3]),
        helper.make_node("Add", ["c2", "m2"], ["a2"], name="add"),
        pad_node("minus_inf", "a2", "p3", value="minus_inf"),
        helper.make_node("MaxPool", ["p3"], ["m3"], name="pool", kernel_shape=[2, 2]),
        pad_node("auto", "m3", "p4"),
        helper.make_node("Conv", ["p4", "w"], ["c4"], name="conv_auto", auto_pad="SAME_UPPER"),
        pad_node("channels", "c4", "p5"),
        helper.make_node("Conv", ["p5", "w3"], ["c5"], name="conv_channels"),
        pad_node("twice", "c5", "p6"),  # read by two Convs: folds into both
        helper.make_node("Conv", ["p6", "w"], ["c6"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p6", "w"], ["c7"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["c6", "c7"], ["y"], name="concat", axis=1),
    ]
    inits = [tensor("w", weight), tensor("w3", RNG.standard_normal((2, 3, 3, 3))),
             tensor("minus_inf", -np.inf)]
    inits += [numpy_helper.from_array(np.array(p, dtype=np.int64), f"{name}.pads")
              for name, p in pads.items()]
    proto = make_model(nodes, inits, input_shape=("N", 2, 12, 12), output_shape=["N", 4, 13, 11])
    onnx.checker.check_model(proto)
    result, cleaned = cleanup(proto)
    reasons = {r.name: r.skipped for r in result.layers if r.op == "Pad"}
    assert reasons == {
        "reflect": "mode is 'reflect', not constant padding",
        "shared": "its output is read by MaxPool 'pool_shared', not only by Convs",
        "minus_inf": "it pads with -inf, not 0",
        "auto": "Conv 'conv_auto' uses auto_pad=SAME_UPPER",
        "channels": "it pads the batch or channel axis",
        "twice": None,
    }
    assert ops(cleaned).count("Pad") == 5
    assert f"Pad 'reflect' kept: {reasons['reflect']}" in result.notes
    assert result.stats["pads_folded"] == 1 and result.stats["pads_kept"] == 5
    (twice,) = [r for r in result.layers if r.name == "twice"]
    assert twice.detail == "folded into conv_a, conv_b (pads [2, 1, 1, 0])"
    conv_pads = {n.name: list(helper.get_attribute_value(a)) for n in cleaned.graph.node
                 for a in n.attribute if a.name == "pads"}
    assert conv_pads == {"conv_a": [3, 2, 2, 1], "conv_b": [3, 2, 2, 1]}
    x = RNG.random((2, 2, 12, 12), dtype=np.float32)
    np.testing.assert_allclose(run(cleaned, x), run(proto, x), atol=1e-5, rtol=1e-5)


def test_fold_pads_off_keeps_them():
    proto = export(FlattenNet().eval(), SAME_SHAPE, dynamo=False, batch=None)
    result, cleaned = cleanup(proto, CleanupConfig(fold_pads=False))
    assert "Pad" in ops(cleaned) and "pads_folded" not in result.stats
    pad = next(n for n in cleaned.graph.node if n.op_type == "Pad")
    initializers = {i.name: numpy_helper.to_array(i) for i in cleaned.graph.initializer}
    np.testing.assert_array_equal(initializers[pad.input[1]], [0, 0, 1, 0, 0, 0, 1, 1])


# -------------------------------------------------- end to end: prune an EfficientNet-style net


class ConvBnAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(
            Conv2dSame(cin, cout, kernel, stride=stride, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        )


def pointwise(cin: int, cout: int, act: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))


class InvertedResidual(nn.Module):
    """EfficientNet-Lite's MBConv without squeeze-excitation: expand, depthwise, project."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.block = nn.Sequential(
            pointwise(cin, mid, act=True),
            ConvBnAct(mid, mid, kernel, stride, groups=mid),
            pointwise(mid, cout, act=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class TinyEfficientNetLite(nn.Module):
    """Stem, a depthwise-separable block, three MBConvs (one residual), head, classifier; every
    k > 1 conv pads itself from ``x.shape`` as the TF ports do."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBnAct(3, 16, 3, stride=2)
        self.blocks = nn.Sequential(
            ConvBnAct(16, 16, 3, groups=16),
            pointwise(16, 16, act=False),
            InvertedResidual(16, 24, 3, stride=2),
            InvertedResidual(24, 24, 5, stride=1),
            InvertedResidual(24, 40, 5, stride=2),
        )
        self.head = pointwise(40, 64, act=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def test_prune_reaches_the_ratio_on_an_efficientnet_style_net(tmp_path):
    from compressor.pipeline import CompressOptions, compress

    torch.manual_seed(0)
    net = TinyEfficientNetLite().train()
    with torch.no_grad():
        net(torch.rand(16, 3, 29, 30))
    proto = export(net.eval(), (3, 29, 30), dynamo=False, batch=None)
    assert ops(proto).count("Pad") == 5
    model = tmp_path / "efficientnet_same.onnx"
    onnx.save(proto, model)
    result = compress(CompressOptions(model=model, output=tmp_path / "pruned.onnx",
                                      method="prune", ratio=0.5))
    assert result.ratio_reached <= 0.55
    # every layer shrank: none was fixed by a run-time Shape or Pad
    assert [layer.skipped for layer in result.layers] == [None] * 14
    assert sum(layer.op == "Conv" for layer in result.layers) == 13
    pruned = onnx.load(result.output)
    assert not {"Shape", "Pad"} & set(ops(pruned))
    x = RNG.random((3, 3, 29, 30), dtype=np.float32)
    assert run(pruned, x).shape == (3, 10)
