"""Small ONNX graphs built by hand for pass tests (fast: no torch export)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime


def make_model(nodes, inits, input_shape, output_name="y", output_rank=2):
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


class Built:
    """A model plus a way to run it (as proto or ir)."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto

    def ir(self) -> ir.Model:
        return ir.serde.deserialize_model(onnx.ModelProto.FromString(self.proto.SerializeToString()))

    @staticmethod
    def run(model, x: np.ndarray) -> np.ndarray:
        if isinstance(model, ir.Model):
            model = ir.serde.serialize_model(model)
        sess = runtime.session(model)
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def mlp(rng):
    """x(16) -> Gemm(32, transB) -> Relu -> Gemm(10, transB)."""
    w1, b1 = rng.standard_normal((32, 16)), rng.standard_normal(32)
    w2, b2 = rng.standard_normal((10, 32)), rng.standard_normal(10)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    return Built(make_model(nodes, dict(w1=w1, b1=b1, w2=w2, b2=b2), [16]))


@pytest.fixture
def convnet(rng):
    """x(3,12,12) -> Conv 3x3 (16, pad 1) -> Relu -> Conv 3x3 (24, stride 2, pad 1) -> Relu
    -> depthwise Conv 3x3 (group 24) -> Flatten -> Gemm(10)."""
    inits = dict(
        c1w=rng.standard_normal((16, 3, 3, 3)) * 0.3, c1b=rng.standard_normal(16) * 0.1,
        c2w=rng.standard_normal((24, 16, 3, 3)) * 0.1, c2b=rng.standard_normal(24) * 0.1,
        dww=rng.standard_normal((24, 1, 3, 3)) * 0.3,
        fw=rng.standard_normal((10, 24 * 6 * 6)) * 0.05, fb=rng.standard_normal(10) * 0.1,
    )
    nodes = [
        helper.make_node("Conv", ["x", "c1w", "c1b"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("Conv", ["ar", "c2w", "c2b"], ["b"], name="conv2", pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["b"], ["br"], name="relu2"),
        helper.make_node("Conv", ["br", "dww"], ["d"], name="dw", pads=[1, 1, 1, 1], group=24),
        helper.make_node("Flatten", ["d"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    return Built(make_model(nodes, inits, [3, 12, 12]))


@pytest.fixture
def built():
    return Built


@pytest.fixture
def deep_mlp(rng):
    """x(24) -> 48 -> 48 -> 48 -> 10, Gemm + Relu."""
    dims = [24, 48, 48, 48, 10]
    inits, nodes, prev = {}, [], "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        inits[f"w{i}"] = rng.standard_normal((b, a)) / np.sqrt(a)
        inits[f"b{i}"] = rng.standard_normal(b) * 0.1
        out = "y" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out], name=f"fc{i}",
                                      transB=1))
        if out != "y":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    return Built(make_model(nodes, inits, [24]))


@pytest.fixture
def compress_zoo(tmp_path):
    """compress_zoo(name, method, ratio, calib_samples): the trained zoo model `name` through
    the whole pipeline (calibrated on the bundled images), loaded back and checked as valid
    ONNX; skips when its checkpoint is missing."""
    from compressor.models import zoo
    from compressor.pipeline import CompressOptions
    from compressor.pipeline import compress as run_pipeline

    def compress(name: str, method: str, ratio: float, calib_samples: int) -> onnx.ModelProto:
        checkpoint = zoo.get(name).checkpoint
        if not checkpoint.is_file():
            pytest.skip(f"no checkpoint for {name}")
        result = run_pipeline(CompressOptions(
            model=checkpoint, arch=name, method=method, ratio=ratio, calib_samples=calib_samples,
            data=str(zoo.DATA_DIR / "fashion_mnist_calib.npz"), output=tmp_path / f"{name}.onnx"))
        proto = onnx.load(str(result.output))
        onnx.checker.check_model(proto, full_check=True)
        return proto

    return compress


@pytest.fixture(scope="module")
def lenet5() -> onnx.ModelProto:
    """The zoo's trained LeNet-5, cleaned up as the pipeline does before its passes (exported
    through TorchScript: a second, where the torch.export exporter takes ten)."""
    import torch

    from compressor.io import export_to_onnx
    from compressor.models import zoo
    from compressor.passes.cleanup import CleanupPass

    entry = zoo.get("lenet5")
    if not entry.checkpoint.is_file():
        pytest.skip("no lenet5 checkpoint")
    traced = torch.jit.trace(zoo.load_pretrained("lenet5").eval(),
                             torch.zeros(2, *entry.input_shape))
    proto = export_to_onnx(traced, tuple(entry.input_shape))
    return ir.serde.serialize_model(CleanupPass()(ir.serde.deserialize_model(proto)).model)
