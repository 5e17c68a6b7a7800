"""ReplaceConvWithDiffConvPass: which Conv nodes it replaces, why it skips the others, and that
the rewritten model runs in onnxruntime with the same outputs (threshold 0) or the threshold
chosen to meet a MAC ratio on calibration data."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import profile, runtime
from compressor.errors import OptionError, PassError
from compressor.passes.diffconv import (
    ConvGeometry,
    DiffConvConfig,
    ReplaceConvWithDiffConvPass,
    kept_fraction,
    reference_diffconv,
    threshold_for_ratio,
    window_patches,
)

RNG = np.random.default_rng(0)


def conv_net() -> onnx.ModelProto:
    """x [N,3,12,12] -> Conv 3x3 pad 1 -> Relu -> Conv(group=2) -> Conv(weight as input W2)
    -> Conv 1x1 stride 2 -> y."""
    inits = {
        "w1": RNG.standard_normal((8, 3, 3, 3)) * 0.3,
        "b1": RNG.standard_normal(8) * 0.1,
        "wg": RNG.standard_normal((8, 4, 3, 3)) * 0.3,
        "w4": RNG.standard_normal((6, 8, 1, 1)) * 0.3,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wg"], ["c2"], name="grouped", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "W2"], ["c3"], name="dynamic", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c3", "w4"], ["y"], name="pointwise", strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12]),
         helper.make_tensor_value_info("W2", TensorProto.FLOAT, [8, 8, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 6, 6])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def feeds(n=2):
    return {
        "x": RNG.standard_normal((n, 3, 12, 12)).astype(np.float32),
        "W2": (RNG.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32),
    }


def run(model, inputs):
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    return runtime.session(model).run(None, inputs)[0]


class FakeCalibration:
    """The interface of passes/calibrate.py's Calibration, computed with plain onnxruntime."""

    def __init__(self, inputs: np.ndarray, w2: np.ndarray):
        self.inputs = inputs
        self.w2 = w2
        self.calls = 0

    def collect(self, model: ir.Model, value_names: list[str]) -> dict[str, np.ndarray]:
        self.calls += 1
        proto = ir.serde.serialize_model(model)
        for name in value_names:
            proto.graph.output.append(helper.make_empty_tensor_value_info(name))
        outputs = runtime.session(proto).run(value_names, {"x": self.inputs, "W2": self.w2})
        return dict(zip(value_names, outputs, strict=True))


def test_replaces_eligible_convs_and_records_why_others_are_skipped():
    proto = conv_net()
    model = ir.serde.deserialize_model(proto)
    result = ReplaceConvWithDiffConvPass(DiffConvConfig())(model)
    skipped = {r.name: r.skipped for r in result.skipped}
    assert "group=2" in skipped["grouped"]
    assert "weight is not a constant" in skipped["dynamic"]
    assert {r.name for r in result.changed} == {"conv1", "pointwise"}
    ops = [(n.domain, n.op_type) for n in result.model.graph]
    assert ops.count((runtime.OP_DOMAIN, "DiffConv")) == 2
    assert result.model.opset_imports[runtime.OP_DOMAIN] == runtime.OP_DOMAIN_VERSION
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out)
    inputs = feeds()
    np.testing.assert_allclose(run(out, inputs), run(proto, inputs), atol=1e-4, rtol=1e-4)


def test_repr_shows_config_and_config_is_validated():
    assert repr(ReplaceConvWithDiffConvPass(DiffConvConfig(threshold=0.5))) == (
        "ReplaceConvWithDiffConvPass(threshold=0.5, ratio=None, restart=16)"
    )
    with pytest.raises(OptionError):
        DiffConvConfig(threshold=-1.0)
    with pytest.raises(OptionError):
        DiffConvConfig(ratio=1.5)
    with pytest.raises(OptionError):
        DiffConvConfig(threshold=0.1, ratio=0.5)
    with pytest.raises(PassError, match="diffconv.*calibration"):
        ReplaceConvWithDiffConvPass(DiffConvConfig(ratio=0.5))(ir.serde.deserialize_model(conv_net()))


def test_ratio_chooses_thresholds_from_calibration_and_runs():
    inputs = feeds(8)
    calibration = FakeCalibration(inputs["x"], inputs["W2"])
    model = ir.serde.deserialize_model(conv_net())
    result = ReplaceConvWithDiffConvPass(DiffConvConfig(ratio=0.6), calibration)(model)
    assert calibration.calls == 1
    for record in result.changed:
        assert record.macs_after <= 0.6 * record.macs_before + 1
        assert record.error is not None and record.error_basis == "calibration"
    thresholds = [n.attributes["threshold"].value for n in result.model.graph if n.op_type == "DiffConv"]
    assert any(t > 0 for t in thresholds)
    # The profile counts DiffConv by its expected kept fraction.
    proto = ir.serde.serialize_model(result.model)
    layers = {layer.name: layer for layer in profile.profile_model(proto).layers}
    conv1 = next(r for r in result.changed if r.name == "conv1")
    assert layers["conv1"].macs == conv1.macs_after
    y = run(proto, inputs)
    assert y.shape == (8, 6, 6, 6) and np.isfinite(y).all()
    # The detail fits one cell of the terminal layer table.
    for record in result.changed:
        assert re.fullmatch(r"threshold [0-9.e+-]+, keeps \d+%", record.detail), record.detail


def test_threshold_for_ratio_meets_ratio():
    x = np.cumsum(RNG.standard_normal((4, 3, 16, 16)), axis=3).astype(np.float32)
    patches = window_patches(x, (3, 3), ConvGeometry(pads=(1, 1, 1, 1)))
    for ratio in [0.9, 0.5, 0.2]:
        threshold, kept = threshold_for_ratio(patches, ratio)
        assert kept <= ratio + 1e-9
        assert kept == pytest.approx(kept_fraction(patches, threshold))
    assert threshold_for_ratio(patches, 1.0)[0] == 0.0


def test_reference_matches_direct_convolution_at_threshold_zero():
    x = RNG.standard_normal((2, 3, 9, 10)).astype(np.float32)
    w = RNG.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = RNG.standard_normal(4).astype(np.float32)
    g = ConvGeometry((2, 1), (1, 0, 2, 1), (1, 2))
    y, performed, dense = reference_diffconv(x, w, b, g, 0.0, restart=3)
    patches = window_patches(x, (3, 2), g).astype(np.float64)
    direct = (patches @ w.reshape(4, -1).T.astype(np.float64)).transpose(0, 3, 1, 2) + b[:, None, None]
    np.testing.assert_allclose(y, direct, atol=1e-4)
    assert performed <= dense
