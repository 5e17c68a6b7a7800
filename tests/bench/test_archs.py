"""bench/archs.py: the ImageNet-shaped speed-benchmark models match torchvision's (and timm's)
parameter counts, "SAME" padding matches onnxruntime's SAME_UPPER Conv, and one model builds
deterministically and exports to an ONNX graph onnxruntime runs like torch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import archs  # noqa: E402


@pytest.mark.parametrize("name", sorted(archs.PUBLISHED_PARAMETERS))
def test_parameter_count_matches_published(name):
    assert archs.parameter_count(archs.definition(name)) == archs.PUBLISHED_PARAMETERS[name]


def test_every_arch_has_a_published_count():
    assert set(archs.PUBLISHED_PARAMETERS) == set(archs.names())


def test_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(KeyError, match="unknown architecture 'resnet19'.*resnet18"):
        archs.definition("resnet19")
    with pytest.raises(KeyError, match="unknown architecture"):
        archs.calibration("resnet19", 1)


def _ort_same_upper(x: np.ndarray, weight: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """onnxruntime's Conv with auto_pad=SAME_UPPER: TensorFlow's "SAME" (extra pixel after)."""
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER",
                            strides=[stride, stride], group=groups)
    graph = helper.make_graph(
        [node], "same", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return runtime.session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("size", [7, 8, 15, 16])
@pytest.mark.parametrize("kernel,stride,groups", [(3, 1, 1), (3, 2, 1), (5, 2, 1), (5, 2, 4),
                                                  (1, 2, 1)])
def test_conv2d_same_matches_onnxruntime_same_upper(size, kernel, stride, groups):
    torch.manual_seed(size * 100 + kernel * 10 + stride)
    conv = archs.Conv2dSame(4, 8, kernel, stride, groups=groups).eval()
    x = torch.randn(2, 4, size, size + 3)  # non-square: height and width padded apart
    with torch.no_grad():
        ours = conv(x).numpy()
    reference = _ort_same_upper(x.numpy(), conv.weight.detach().numpy(), stride, groups)
    assert ours.shape == reference.shape == (2, 8, -(-size // stride), -(-(size + 3) // stride))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_same_padding_formula():
    # 224 at stride 2, k 3: output 112 needs (112-1)*2+3-224 = 1 pixel, after the image
    assert archs.same_padding(224, 3, 2) == 1
    assert archs.same_padding(225, 3, 2) == 2
    assert archs.same_padding(224, 5, 2) == 3
    assert archs.same_padding(224, 3, 1) == 2
    assert archs.same_padding(4, 1, 2) == 0


def test_calibration_is_seeded_and_normalised():
    a, b = archs.calibration("resnet18", 3, seed=1), archs.calibration("resnet18", 3, seed=1)
    assert a.shape == (3, *archs.INPUT_SHAPE) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, archs.calibration("resnet18", 3, seed=2))
    # pixels in [0, 1] normalised with the ImageNet statistics
    mean = np.asarray(archs.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(archs.IMAGENET_STD).reshape(1, 3, 1, 1)
    pixels = a * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="at least one image"):
        archs.calibration("resnet18", 0)


def test_lite0_builds_seeded_and_exports_with_asymmetric_same_pads(tmp_path):
    """The one model run at 224: two images for the BatchNorm statistics, one to compare."""
    model = archs.build("efficientnet_lite0", seed=3, statistics_samples=2)
    again = archs.build("efficientnet_lite0", seed=3, statistics_samples=2)
    state, state_again = model.state_dict(), again.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 49
    # statistics far from the untrained (0, 1): folding them changes the convolutions
    assert all(bn.running_mean.abs().max() > 1e-3 for bn in norms)
    assert all((bn.running_var - 1).abs().max() > 1e-2 for bn in norms)
    assert not torch.allclose(norms[0].weight, torch.ones_like(norms[0].weight))

    path = archs.export("efficientnet_lite0", tmp_path / "lite0.onnx", batch=1, seed=3,
                        statistics_samples=2)
    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, *archs.INPUT_SHAPE]
    strided = [n for n in proto.graph.node if n.op_type == "Conv"
               and helper.get_attribute_value(next(a for a in n.attribute
                                                   if a.name == "strides")) == [2, 2]]
    assert len(strided) == 5  # the stem and four stride-2 depthwise convs
    for node in strided:
        pads = helper.get_attribute_value(next(a for a in node.attribute if a.name == "pads"))
        assert pads[2] == pads[0] + 1 and pads[3] == pads[1] + 1  # the odd pixel after

    x = archs.calibration("efficientnet_lite0", 1, seed=4)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = runtime.session(proto).run(None, {"input": x})[0]
    assert got.shape == (1, archs.NUM_CLASSES)
    assert expected.std() > 1e-2  # not a dead network
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * float(np.abs(expected).max()))
