"""prune and lsh on every zoo model at ratios 0.75 and 0.5 (issue #4): the result is a valid
graph on budget that still agrees with the original; residual and depthwise groups are shrunk
consistently; the groups left whole say why. Small calibration set (32 images) to stay fast."""

from pathlib import Path

import numpy as np
import onnx
import pytest

from compressor import io, runtime
from compressor.data import load_data
from compressor.models import zoo
from compressor.pipeline import CompressOptions, compress

ROOT = Path(__file__).resolve().parents[2]
CALIB = ROOT / "models" / "data" / "fashion_mnist_calib.npz"
EVAL = ROOT / "models" / "data" / "fashion_mnist_eval.npz"
# Top-1 agreement with the original on 256 held-out images, with 32 calibration images. Loose
# floors (lenet5, 6 and 16 channels, agrees on ~55% at 0.5); a broken rewrite (wrong channels
# dropped, or mis-wired) lands near chance, 10%.
MIN_AGREEMENT = {0.75: 0.8, 0.5: 0.4}


def _predict(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = runtime.session(proto)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)


def _channels(proto: onnx.ModelProto) -> dict[str, int]:
    """Output channels of every Conv, and of every Add (a residual join), by node name."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.output]}
    return {n.name: dims[n.output[0]][1] for n in proto.graph.node
            if n.op_type in ("Conv", "Add") and n.output[0] in dims
            and len(dims[n.output[0]]) == 4}


@pytest.fixture(scope="module")
def held_out():
    return load_data(EVAL).x[:256].astype(np.float32)


@pytest.mark.parametrize("ratio", [0.75, 0.5])
@pytest.mark.parametrize("method", ["prune", "lsh"])
@pytest.mark.parametrize("arch", zoo.names())
def test_zoo_model_compresses_validly(arch, method, ratio, held_out, tmp_path):
    out = tmp_path / f"{arch}.onnx"
    result = compress(CompressOptions(model=zoo.get(arch).checkpoint, arch=arch, method=method,
                                      ratio=ratio, data=str(CALIB), calib_samples=32,
                                      output=out))
    assert result.ratio_reached <= ratio * 1.02
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)

    original = io.load_model(zoo.get(arch).checkpoint, arch=arch).proto
    agreement = float((_predict(proto, held_out) == _predict(original, held_out)).mean())
    assert agreement >= MIN_AGREEMENT[ratio], agreement

    groups = [g for p in result.passes for g in p.stats.get("groups", [])]
    assert any(g["kept"] < g["channels"] for g in groups)
    for g in groups:  # a group left whole for its structure says why, and is left whole
        if g["skipped"]:
            assert g["kept"] == g["channels"] and g["skipped"].strip()
    # the logits' channels reach the model output: never touched, and said so
    assert any("output" in (g["skipped"] or "") for g in groups)

    # residual joins: both sides of every Add kept the same channels (ORT ran it), and on
    # the residual nets the stream itself was narrowed somewhere
    before, after = _channels(original), _channels(proto)
    adds = [n for n in proto.graph.node if n.op_type == "Add" and n.name in after]
    if arch in ("resnet20", "mobilenetv2") and ratio == 0.5:
        assert any(after[n.name] < before[n.name] for n in adds)
    # depthwise convs: one filter per channel still, and narrowed with what feeds them
    weights = {i.name: i.dims for i in proto.graph.initializer}
    for node in proto.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            assert list(weights[node.input[1]][:2]) == [group, 1]
            assert after[node.name] == group
    if arch == "mobilenetv2":
        depthwise = [n.name for n in proto.graph.node if n.op_type == "Conv"
                     and next((a.i for a in n.attribute if a.name == "group"), 1) > 1]
        assert depthwise and any(after[n] < before[n] for n in depthwise)
