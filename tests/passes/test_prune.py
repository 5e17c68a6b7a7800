"""The prune pass: budgets, criteria, per-layer limits, records, refit; always a valid graph."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import structural_nets as nets

from compressor import runtime
from compressor.errors import CompressionError, OptionError
from compressor.passes.calibrate import Calibration
from compressor.passes.prune import PruneChannelsPass, PruneConfig


def _ir(proto):
    return ir.serde.deserialize_model(onnx.ModelProto.FromString(proto.SerializeToString()))


def _run(model, x):
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    sess = runtime.session(proto)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _input(proto, n, seed=0):
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def test_ratio_one_is_the_identity():
    proto = nets.residual_net(np.random.default_rng(0))
    x = _input(proto, 4)
    result = PruneChannelsPass(PruneConfig(ratio=1.0))(_ir(proto))
    assert not result.modified and result.stats["ratio_reached"] == 1.0
    np.testing.assert_array_equal(_run(result.model, x), _run(proto, x))
    assert all(r.skipped for r in result.layers)


@pytest.mark.parametrize("ranking", ["global", "per-layer"])
@pytest.mark.parametrize("build", [nets.residual_net, nets.mobile_net, nets.concat_net,
                                   nets.transformer_mlp])
def test_budget_is_met_and_graph_stays_valid(build, ranking):
    proto = build(np.random.default_rng(0))
    result = PruneChannelsPass(PruneConfig(ratio=0.6, ranking=ranking))(_ir(proto))
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out, full_check=True)
    assert result.stats["ratio_reached"] <= 0.6 + 1e-9
    assert result.stats["macs_after"] == pytest.approx(
        result.stats["macs_before"] - sum(r.macs_before - r.macs_after for r in result.layers))
    x = _input(proto, 3)
    assert _run(out, x).shape == (3, 10)
    assert len(out.SerializeToString()) < len(proto.SerializeToString())


def test_no_group_is_cut_below_its_minimum():
    proto = nets.residual_net(np.random.default_rng(0))
    result = PruneChannelsPass(PruneConfig(ratio=0.05, min_channels_fraction=0.25))(_ir(proto))
    for g in result.stats["groups"]:
        if g["skipped"] is None:
            assert g["kept"] >= np.ceil(0.25 * g["channels"])
    assert "not reachable" in " ".join(result.notes)


def test_l1_removes_the_smallest_neurons():
    rng = np.random.default_rng(0)
    proto = nets.mlp(rng, hidden=(12, 8))
    w0 = next(i for i in proto.graph.initializer if i.name == "w0")
    array = onnx.numpy_helper.to_array(w0).copy()
    array[[1, 4, 7]] *= 1e-3  # three tiny neurons
    w0.CopyFrom(onnx.numpy_helper.from_array(array, "w0"))
    result = PruneChannelsPass(PruneConfig(ratio=0.65, ranking="per-layer", criterion="l1"))(
        _ir(proto))
    kept = onnx.numpy_helper.to_array(next(
        i for i in ir.serde.serialize_model(result.model).graph.initializer if i.name == "w0"))
    assert len(kept) <= 9  # the three tiny neurons went first
    survivors = np.delete(array, [1, 4, 7], axis=0)
    assert all(any(np.array_equal(row, s) for s in survivors) for row in kept)
    rec = {r.name: r for r in result.layers}
    assert rec["fc0"].detail.startswith("pruned 12 -> ")
    assert rec["fc1"].detail.startswith("pruned 8 -> ") and "inputs 12 -> " in rec["fc1"].detail
    assert rec["fc2"].detail.startswith("inputs 8 -> ")


def test_fixed_groups_are_skipped_with_reasons():
    proto = nets.unsupported_net(np.random.default_rng(0))
    result = PruneChannelsPass(PruneConfig(ratio=0.9))(_ir(proto))
    rec = {r.name: r for r in result.layers}
    assert rec["g"].skipped.startswith("output channels fixed: Conv 'g' is a grouped conv")
    assert "LRN" in rec["c"].skipped
    assert rec["d"].detail.startswith("pruned 4 -> ")
    assert "inputs 4 -> " in rec["e"].detail  # reads d
    reasons = {g["origin"]: g["skipped"] for g in result.stats["groups"]}
    # the Split through b's channels cuts its group in two; e's flatten target reads only the
    # batch at run time: both prunable (tests/passes/test_dependency.py)
    assert reasons["Conv 'b' [0:3]"] is None and reasons["Conv 'b' [3:6]"] is None
    assert reasons["Conv 'e'"] is None
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)


@pytest.mark.parametrize("criterion", ["l1", "l2", "activation", "lsh", "reconstruction"])
def test_every_criterion_with_calibration(criterion):
    proto = nets.residual_net(np.random.default_rng(0))
    x = _input(proto, 64, seed=1)
    result = PruneChannelsPass(PruneConfig(ratio=0.6, criterion=criterion),
                               Calibration(x))(_ir(proto))
    assert result.stats["ratio_reached"] <= 0.6 + 1e-9
    assert any(f"({criterion})" in r.detail for r in result.layers)
    assert all(r.error is not None for r in result.layers if "inputs" in r.detail)
    y, y_ref = _run(result.model, x), _run(proto, x)
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 0.5


def test_refit_beats_bias_correction_beats_nothing():
    """On the calibration data: least-squares refit < bias correction < plain pruning."""
    proto = nets.residual_net(np.random.default_rng(0), batchnorm=False)
    x = _input(proto, 96, seed=2)
    y_ref = _run(proto, x)
    errors = {}
    for name, calibration, refit in (("none", None, False), ("bias", Calibration(x), False),
                                     ("refit", Calibration(x), True)):
        result = PruneChannelsPass(PruneConfig(ratio=0.5, refit=refit), calibration)(_ir(proto))
        y = _run(result.model, x)
        errors[name] = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
    assert errors["refit"] < errors["bias"] < errors["none"]


def test_activation_needs_data():
    with pytest.raises(CompressionError, match="needs calibration data"):
        PruneChannelsPass(PruneConfig(criterion="activation"))(
            _ir(nets.mlp(np.random.default_rng(0))))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, r"--ratio must be in \(0, 1\]"),
        ({"criterion": "taylor"}, "unknown --criterion 'taylor'"),
        ({"ranking": "random"}, "ranking must be one of"),
        ({"min_channels_fraction": 1.5}, "--min-channels-fraction must be in"),
        ({"lsh_bits": 0}, "--lsh-bits must be in"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(OptionError, match=message):
        PruneConfig(**kwargs)


def test_repr_shows_config():
    assert repr(PruneChannelsPass(PruneConfig(ratio=0.25))).startswith(
        "PruneChannelsPass(ratio=0.25, criterion='l1', ranking='global'")
