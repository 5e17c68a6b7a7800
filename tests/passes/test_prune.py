"""The prune pass: budgets, criteria, per-layer limits, records, refit; always a valid graph."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import structural_nets as nets
from fake_latency import FakeTable, fake_ms

from compressor import runtime
from compressor.errors import CompressionError, OptionError
from compressor.passes.budget import EXCLUDED_REASON
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


# ----------------------------------------------------------------------------- by measured time


CONV2 = "/features/3/Conv"  # lenet5's 6 -> 16 channel conv, flattened into the first Gemm


def _weight(proto, node_name):
    name = next(n.input[1] for n in proto.graph.node if n.name == node_name)
    return onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == name))


@pytest.mark.parametrize("ranking", ["global", "per-layer"])
def test_speedup_meets_the_measured_budget_on_a_zoo_model(lenet5, ranking):
    table = FakeTable()
    cfg = PruneConfig(ratio=1.0, speedup=1.5, ranking=ranking)
    result = PruneChannelsPass(cfg, latency=table)(_ir(lenet5))
    stats = result.stats
    before = fake_ms(lenet5)
    assert stats["latency_ms_before"] == pytest.approx(before)
    assert stats["predicted_latency_ms"] <= before / 1.5 + 1e-12
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out, full_check=True)
    assert fake_ms(out) == pytest.approx(stats["predicted_latency_ms"], rel=1e-9)
    assert not any("not reachable" in n for n in result.notes)
    timed = [r for r in result.layers if r.latency_before_ms is not None]
    assert len(timed) == 5  # every compute layer reads or writes a prunable group
    for record in timed:
        assert record.latency_after_ms <= record.latency_before_ms + 1e-12
    assert sum(r.latency_before_ms - r.latency_after_ms for r in timed) == pytest.approx(
        before - stats["predicted_latency_ms"])
    assert stats["latency_cache_misses"] == table.misses
    again = PruneChannelsPass(cfg, latency=table)(_ir(lenet5))
    assert again.stats["latency_cache_misses"] == 0 and again.stats["latency_cache_hits"] > 0
    assert [g["kept"] for g in again.stats["groups"]] == [g["kept"] for g in stats["groups"]]


def test_widths_measured_slower_are_never_chosen(lenet5):
    def narrow_conv2_is_slow(layer):
        conv2 = layer.op == "Conv" and layer.input_shape[2:] == (14, 14)
        return 1.0 if conv2 and layer.weight_shape[0] < 16 else 0.0

    plain = PruneChannelsPass(PruneConfig(ratio=1.0, speedup=4.0), latency=FakeTable())(
        _ir(lenet5))
    assert _weight(ir.serde.serialize_model(plain.model), CONV2).shape[0] < 16  # when faster
    result = PruneChannelsPass(PruneConfig(ratio=1.0, speedup=4.0),
                               latency=FakeTable(narrow_conv2_is_slow))(_ir(lenet5))
    out = ir.serde.serialize_model(result.model)
    assert _weight(out, CONV2).shape[0] == 16
    conv2 = {r.name: r for r in result.layers}[CONV2]
    reason = conv2.skipped if conv2.skipped else conv2.detail
    assert "every narrower width measured no faster" in reason
    assert conv2.latency_after_ms <= conv2.latency_before_ms
    assert fake_ms(out, narrow_conv2_is_slow) == pytest.approx(
        result.stats["predicted_latency_ms"], rel=1e-9)


@pytest.mark.parametrize("speedup", [None, 1.5])
def test_exclude_keeps_a_layer_and_its_groups_whole(lenet5, speedup):
    cfg = PruneConfig(ratio=0.5 if speedup is None else 1.0, speedup=speedup,
                      exclude=frozenset({CONV2}))
    result = PruneChannelsPass(cfg, latency=FakeTable())(_ir(lenet5))
    out = ir.serde.serialize_model(result.model)
    np.testing.assert_array_equal(_weight(out, CONV2), _weight(lenet5, CONV2))
    records = {r.name: r for r in result.layers}
    assert records[CONV2].skipped == f"output channels fixed: {EXCLUDED_REASON}"
    assert records["/features/0/Conv"].skipped == f"output channels fixed: {EXCLUDED_REASON}"
    assert result.modified  # the classifier's groups are still pruned


def test_speedup_and_ratio_must_both_hold(lenet5):
    time_only = PruneChannelsPass(PruneConfig(ratio=1.0, speedup=1.2),
                                  latency=FakeTable())(_ir(lenet5))
    both = PruneChannelsPass(PruneConfig(ratio=0.5, speedup=1.2), latency=FakeTable())(
        _ir(lenet5))
    assert time_only.stats["ratio_reached"] > 0.5  # so the MACs cap binds
    assert both.stats["ratio_reached"] <= 0.5
    assert both.stats["predicted_latency_ms"] <= fake_ms(lenet5) / 1.2


def test_unreachable_speedup_says_so(lenet5):
    result = PruneChannelsPass(PruneConfig(ratio=1.0, speedup=100.0), latency=FakeTable())(
        _ir(lenet5))
    (note,) = [n for n in result.notes if "not reachable" in n]
    assert note.startswith(f"speedup 100 not reachable by pruning: predicted "
                           f"{result.stats['predicted_speedup']:.2f}x")
    for g in result.stats["groups"]:
        if g["skipped"] is None:
            assert g["kept"] == max(1, int(np.ceil(0.1 * g["channels"])))  # at the minimum


def test_without_speedup_nothing_is_timed(lenet5):
    table = FakeTable()
    timed = PruneChannelsPass(PruneConfig(ratio=0.5), latency=table)(_ir(lenet5))
    plain = PruneChannelsPass(PruneConfig(ratio=0.5))(_ir(lenet5))
    assert (table.hits, table.misses) == (0, 0)
    assert timed.stats == plain.stats and "predicted_latency_ms" not in timed.stats
    assert [r.as_dict() for r in timed.layers] == [r.as_dict() for r in plain.layers]


def test_layer_times_interpolate_between_measured_widths(lenet5):
    """A time between grid widths is the linear interpolation of the two measured ones; grid
    widths and the dense width are measured as they are."""
    from compressor.passes.prune import LayerLatencies, prepare

    table = FakeTable(lambda layer: 1e-3 * (layer.weight_shape[0] % 7))  # not linear
    prep = prepare(_ir(lenet5))
    model = LayerLatencies(prep.graph, prep.groups, table, prep.original, multiple=1)
    i = next(i for i in model.indices if prep.graph.layers[i].name == "/classifier/1/Gemm")
    out_group = prep.graph.layers[i].out_layout[0].group  # 120 neurons: grid step 8
    assert model.axes[i][1].step == 8

    def at(width):
        return model.layer_ms(i, {out_group: width})

    def measured(width):
        return table.measure(model.timing_model(i, 400, width), 0.0)

    for width in (120, 112, 8, 5):
        assert at(width) == pytest.approx(measured(width))
    assert at(117) == pytest.approx(measured(112) + 5 / 8 * (measured(120) - measured(112)))
    assert at(117) != pytest.approx(measured(117))
    assert len(model._points) == 4  # 117 is read from its corners 112 and 120: no new point


def test_timing_models_follow_the_layer_widths():
    """Candidates keep the layer's attributes and fused activation at the asked widths; a
    depthwise conv's group follows its input width; every candidate runs."""
    from compressor.passes.prune import LayerLatencies, prepare

    prep = prepare(_ir(nets.mobile_net(np.random.default_rng(0))))
    table = FakeTable()
    model = LayerLatencies(prep.graph, prep.groups, table, prep.original, multiple=8)
    layers = {prep.graph.layers[i].name: i for i in model.indices}
    dw = model.timing_model(layers["dw"], 16, 16)
    conv, clip = dw.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    assert (conv.op_type, attrs["group"], attrs["pads"]) == ("Conv", 16, [1, 1, 1, 1])
    assert clip.op_type == "Clip"
    weights = {i.name: tuple(i.dims) for i in dw.graph.initializer}
    assert weights[conv.input[1]] == (16, 1, 3, 3)
    x_dims = [d.dim_value for d in dw.graph.input[0].type.tensor_type.shape.dim]
    assert x_dims == [1, 16, 8, 8]
    expand = model.timing_model(layers["e"], 8, 16)
    weights = {i.name: tuple(i.dims) for i in expand.graph.initializer}
    assert weights[expand.graph.node[0].input[1]] == (16, 8, 1, 1)
    assert [n.op_type for n in expand.graph.node] == ["Conv", "Clip"]
    for i in model.indices:
        cin, cout = model.widths(i, {})
        candidate = model.timing_model(i, cin, cout)
        sess = runtime.session(candidate)
        shape = [d.dim_value for d in candidate.graph.input[0].type.tensor_type.shape.dim]
        y = sess.run(None, {"x": np.ones(shape, np.float32)})[0]
        assert np.all(np.isfinite(y))


def test_speedup_config_error():
    with pytest.raises(OptionError, match="--speedup must be >= 1"):
        PruneConfig(speedup=0.9)
