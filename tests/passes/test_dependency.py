"""Channel dependency analysis and the shrink that applies to every coupled tensor."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import structural_nets as nets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor import runtime
from compressor.passes.dependency import ChannelTransform, analyze, shrink
from compressor.profile import profile_model


def _ir(proto):
    return ir.serde.deserialize_model(onnx.ModelProto.FromString(proto.SerializeToString()))


def _run(model, x):
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    sess = runtime.session(proto)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _groups_by_origin(graph):
    return {g.origin.split("'")[1]: g for g in graph.groups.values()}


def test_residual_groups_join_every_producer_and_consumer():
    graph = analyze(_ir(nets.residual_net(np.random.default_rng(0))))
    groups = _groups_by_origin(graph)
    # stem, conv b (+ its BatchNorm) and the identity shortcut are one residual group
    stem = groups["stem"]
    assert stem.prunable and {"stem", "b", "bn", "add1", "r1"} <= set(stem.tensors)
    produced = {(s.node.name, s.kind, s.axis) for s in stem.producers}
    assert {("stem", "weight", 0), ("b", "weight", 0), ("b", "bias", 0)} <= produced
    assert {("bn", "param", 0)} <= produced  # scale, bias, mean, var
    assert {s.node.name for s in stem.consumers} == {"a", "c", "s"}
    # the projection shortcut (1x1 conv s) and conv d share one mask
    proj = groups["d"]
    assert {s.node.name for s in proj.producers if s.kind == "weight"} == {"d", "s"}
    assert {s.node.name for s in proj.consumers} == {"fc"}
    # the global pool and flatten carry the channels into the Gemm one feature each
    flat = [ca for v, ca in graph.axes.items() if v.name == "flat"][0]
    assert [seg.block for seg in flat.layout] == [1]
    assert groups["fc"].reason == "reaches model output 'y'"
    assert all(g.prunable for name, g in groups.items() if name != "fc")


def test_depthwise_multiplier_and_reshape_are_tracked():
    graph = analyze(_ir(nets.mobile_net(np.random.default_rng(0))))
    groups = _groups_by_origin(graph)
    hidden = groups["e"]
    assert {s.node.name for s in hidden.producers if s.kind == "weight"} == {"e", "dw"}
    assert {s.node.name for s in hidden.consumers} == {"p"}
    stem = groups["stem"]  # the inverted residual's stream, through the x2 depthwise conv
    assert {"c0", "p", "res", "m", "pool", "flat"} <= set(stem.tensors)
    m_axis = [ca for v, ca in graph.axes.items() if v.name == "m"][0]
    assert [s.block for s in m_axis.layout] == [2]
    assert sorted((r.kind, r.node.name) for r in graph.rewrites) == [
        ("group", "dw"), ("group", "m"), ("reshape", "reshape")]


def test_concat_and_split_keep_groups_side_by_side():
    graph = analyze(_ir(nets.concat_net(np.random.default_rng(0))))
    groups = _groups_by_origin(graph)
    assert all(groups[k].prunable for k in ("a", "b", "c"))
    cat2 = [ca for v, ca in graph.axes.items() if v.name == "flat"][0]
    assert [(graph.groups[s.group].origin, s.block) for s in cat2.layout] == [
        ("Conv 'c'", 36), ("Conv 'b'", 36)]
    assert [r.kind for r in graph.rewrites] == ["split"]


def test_transformer_mlp_hidden_width_prunable_residual_stream_not():
    graph = analyze(_ir(nets.transformer_mlp(np.random.default_rng(0))))
    groups = _groups_by_origin(graph)
    assert groups["mm1"].prunable
    assert {s.node.name for s in groups["mm1"].slices} == {"mm1", "bias1", "mm2"}
    assert "joins them with model input 'x'" in groups["mm2"].reason


def test_unsupported_structures_are_fixed_with_reasons():
    graph = analyze(_ir(nets.unsupported_net(np.random.default_rng(0))))
    reasons = {name: g.reason for name, g in _groups_by_origin(graph).items()}
    assert "grouped conv (group=2)" in reasons["a"] and "grouped conv" in reasons["g"]
    assert reasons["b"] == "Split 'split' cuts through a channel group"
    assert reasons["c"] == "consumed by LRN 'lrn', an op the analysis does not model"
    assert reasons["e"] == "Reshape 'flatten' has a target shape computed at run time"
    assert reasons["d"] is None  # between the LRN and the run-time reshape: still prunable


def _dead_channel_transforms(graph, names):
    groups = _groups_by_origin(graph)
    return {groups[n].id: ChannelTransform.keep(groups[n].size, range(2, groups[n].size))
            for n in names}


@pytest.mark.parametrize("dead", [("stem",), ("a", "c"), ("proj",), ("stem", "a", "c", "proj")])
def test_removing_dead_channels_is_exact(dead):
    """Channels whose every producer is zero contribute nothing: removing them from every
    coupled tensor (residual groups included) must not change the outputs."""
    proto = nets.residual_net(np.random.default_rng(1), batchnorm=False, dead=dead)
    x = np.random.default_rng(2).random((4, 3, 8, 8), dtype=np.float32)
    model = _ir(proto)
    graph = analyze(model)
    names = {"stem": "stem", "a": "a", "c": "c", "proj": "d"}
    shrink(model, graph, _dead_channel_transforms(graph, [names[d] for d in dead]))
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=1e-5, atol=1e-5)
    assert len(out.SerializeToString()) < len(proto.SerializeToString())


def test_keeping_every_channel_is_the_identity():
    for build in (nets.residual_net, nets.mobile_net, nets.concat_net, nets.transformer_mlp):
        proto = build(np.random.default_rng(3))
        model = _ir(proto)
        graph = analyze(model)
        shrink(model, graph, {g.id: ChannelTransform.keep(g.size, range(g.size))
                              for g in graph.prunable})
        shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
        x = np.random.default_rng(4).random((2, *shape), dtype=np.float32)
        np.testing.assert_array_equal(_run(model, x), _run(proto, x))


BUILDERS = [nets.residual_net, nets.mobile_net, nets.concat_net, nets.transformer_mlp,
            nets.unsupported_net]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(builder=st.sampled_from(BUILDERS), seed=st.integers(0, 2**16))
def test_random_shrinks_stay_valid_and_macs_are_predicted(builder, seed):
    """Any per-group subset of channels gives a valid graph that ORT runs, with exactly the
    MACs the dependency graph predicts."""
    rng = np.random.default_rng(seed)
    proto = builder(rng)
    model = _ir(proto)
    graph = analyze(model)
    transforms, sizes = {}, {}
    for g in graph.prunable:
        k = int(rng.integers(1, g.size + 1))
        transforms[g.id] = ChannelTransform.keep(g.size, rng.choice(g.size, k, replace=False))
        sizes[g.id] = k
    predicted = graph.macs(sizes)
    shrink(model, graph, transforms)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    assert profile_model(out).macs == predicted
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    y = _run(out, rng.random((3, *shape), dtype=np.float32))
    assert y.shape == (3, 10) and np.all(np.isfinite(y))


def test_merge_transform_averages_producers_and_sums_consumers():
    t = ChannelTransform.merge(4, [[0, 2], [1], [3]], weights=np.array([1.0, 5.0, 3.0, 2.0]))
    np.testing.assert_allclose(t.produce[0], [0.25, 0, 0.75, 0])
    np.testing.assert_allclose(t.consume[0], [1, 0, 1, 0])
    assert t.kept == 3 and t.size == 4


def test_shrinking_a_fixed_group_is_refused():
    model = _ir(nets.residual_net(np.random.default_rng(0)))
    graph = analyze(model)
    fixed = next(g for g in graph.groups.values() if not g.prunable)
    with pytest.raises(Exception, match="cannot change"):
        shrink(model, graph, {fixed.id: ChannelTransform.keep(fixed.size, [0])})
