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
        ("entry", "reshape"), ("group", "dw"), ("group", "m")]


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
    reasons = {g.origin: g.reason for g in graph.groups.values()}
    assert "grouped conv (group=2)" in reasons["Conv 'a'"]
    assert "grouped conv" in reasons["Conv 'g'"]
    assert reasons["Conv 'c'"] == "consumed by LRN 'lrn', an op the analysis does not model"
    assert reasons["Conv 'd'"] is None  # between the LRN and the reshape: still prunable
    # the Split through conv b's channels cuts its group in two, pruned apart
    assert reasons["Conv 'b' [0:3]"] is None and reasons["Conv 'b' [3:6]"] is None
    # the flatten's target is Concat(Shape(e)[:1], [-1]): the run-time piece is the batch,
    # which does not change, and the channel entry is -1
    assert reasons["Conv 'e'"] is None


def _by_origin(graph):
    return {g.origin: g for g in graph.groups.values()}


def _axis(graph, name):
    return next(ca for v, ca in graph.axes.items() if v.name == name)


def test_split_and_slice_on_the_channels_cut_groups():
    """A Split of a conv's output into halves (YOLO's C2f) and a Slice of the middle of one
    cut their groups where the outputs end; Resize and a reflect Pad pass channels through."""
    graph = analyze(_ir(nets.neck_net(np.random.default_rng(0))))
    groups = _by_origin(graph)
    assert {name: g.size for name, g in groups.items() if g.prunable} == {
        "Conv 'a' [0:4]": 4, "Conv 'a' [4:8]": 4, "Conv 'c'": 8,
        "Conv 'd' [0:2]": 2, "Conv 'd' [2:6]": 4, "Conv 'd' [6:8]": 2}
    first, second = groups["Conv 'a' [0:4]"], groups["Conv 'a' [4:8]"]
    # conv a's weight and bias are sliced per half; the residual joins conv b to the second
    assert {(s.node.name, s.kind) for s in first.producers} == {("a", "weight"), ("a", "bias")}
    assert {s.node.name for s in second.producers if s.kind == "weight"} == {"a", "b"}
    assert {s.node.name for s in first.consumers} == {"c"}
    assert {s.node.name for s in second.consumers} == {"b", "c"}
    cat = _axis(graph, "cat")
    assert [graph.groups[s.group].origin for s in cat.layout] == [
        "Conv 'a' [0:4]", "Conv 'a' [4:8]", "Conv 'a' [4:8]"]
    assert {"up", "down", "padded"} <= set(groups["Conv 'c'"].tensors)
    assert [graph.groups[s.group].origin for s in _axis(graph, "sl").layout] == [
        "Conv 'd' [2:6]"]
    rewrites = sorted((r.kind, r.node.name, r.input) for r in graph.rewrites)
    assert rewrites == [("entry", "downsample", 3), ("entry", "slice", 1),
                        ("entry", "slice", 2), ("split", "split", 1)]


def test_upsample_scales_keep_the_channels():
    graph = analyze(_ir(nets.upsample_net(np.random.default_rng(0))))
    groups = _by_origin(graph)
    assert groups["Conv 'a'"].prunable and "up" in groups["Conv 'a'"].tensors
    assert {s.node.name for s in groups["Conv 'a'"].consumers} == {"b"}


def test_attention_heads_are_one_group_across_q_k_v_and_the_output_projection():
    graph = analyze(_ir(nets.attention_net(np.random.default_rng(0))))
    groups = _by_origin(graph)
    heads = groups["MatMul 'q' in blocks of 4"]
    assert heads.prunable and heads.size == 2
    produced = {(s.node.name, s.kind, s.axis): s.layout for s in heads.producers}
    assert set(produced) == {(k, "weight", 1) for k in "qkv"} | {
        (f"{k}_bias", "param", 0) for k in "qkv"}
    assert all([seg.block for seg in lay] == [4] for lay in produced.values())
    assert [(s.node.name, s.axis, s.layout[0].block) for s in heads.consumers] == [("o", 0, 4)]
    # on the heads axis after the reshape and through the attention MatMuls
    assert _axis(graph, "q_heads").axis == -2 and _axis(graph, "scores").axis == -3
    assert [s.block for s in _axis(graph, "attn").layout] == [1]
    attention = [la for la in graph.layers if la.kind == "batched_matmul"]
    assert [la.node.name for la in attention] == ["scores", "context"]
    assert all(la.out_layout == _axis(graph, "scores").layout for la in attention)
    # the residual stream is tied to the model input; the feed-forward width is free
    assert groups["MatMul 'o'"].reason == "Add 'residual1' joins them with model input 'x'"
    hidden = groups["MatMul 'ff1'"]
    assert hidden.prunable and hidden.size == 16
    assert {s.node.name for s in hidden.slices} == {"ff1", "ff1_bias", "ff2"}


def test_attention_heads_with_a_run_time_width_are_refused():
    graph = analyze(_ir(nets.attention_net(np.random.default_rng(0), runtime_width=True)))
    heads = _by_origin(graph)["MatMul 'q' in blocks of 4"]
    assert heads.reason == ("Reshape 'merge_heads' computes the channel count of its target "
                            "shape at run time")
    assert _by_origin(graph)["MatMul 'ff1'"].prunable


def test_layernorm_scale_and_bias_follow_the_channels():
    graph = analyze(_ir(nets.layernorm_net(np.random.default_rng(0))))
    hidden = _by_origin(graph)["MatMul 'mm1'"]
    assert hidden.prunable
    assert {(s.node.name, s.value.name, s.kind) for s in hidden.producers} == {
        ("mm1", "w1", "weight"), ("bias1", "b1", "param"), ("ln", "ln_s", "param"),
        ("ln", "ln_b", "param")}
    model = _ir(nets.layernorm_net(np.random.default_rng(0)))
    graph = analyze(model)
    group = _by_origin(graph)["MatMul 'mm1'"]
    shrink(model, graph, {group.id: ChannelTransform.keep(8, [0, 3, 5])})
    assert [tuple(v.shape) for v in model.graph.initializers.values()
            if v.name in ("ln_s", "ln_b")] == [(3,), (3,)]


def test_refused_channel_ops_give_their_reasons():
    graph = analyze(_ir(nets.refused_net(np.random.default_rng(0))))
    reasons = {name: g.reason for name, g in _by_origin(graph).items()}
    assert reasons["Conv 'a'"] == "Pad 'pad_channels' pads the channel axis"
    assert reasons["Conv 'c'"] == "Slice 'slice_step' slices the channels with step 2"
    assert reasons["Conv 'e'"] == "Resize 'resize_channels' resizes the channel axis"
    crossing = "Reshape 'blocks' splits the channels into blocks of 4 that cross channel groups"
    assert reasons["Conv 'f'"] == reasons["Conv 'g'"] == crossing
    assert reasons["Conv 'h'"] == "Split 'split_features' cuts through the features of one channel"
    assert all(reasons[f"Conv '{k}'"] is None for k in ("a2", "c2", "e2", "h2"))


def test_a_bias_shared_by_unrelated_layers_is_copied_for_each():
    proto = nets.shared_bias_net(np.random.default_rng(0), dead=("a",))
    model = _ir(proto)
    graph = analyze(model)
    groups = _by_origin(graph)
    assert groups["Conv 'a'"].prunable and groups["Conv 'b'"].prunable
    assert [v.name for v in graph.private] == ["zeros"]
    shrink(model, graph, {groups["Conv 'a'"].id: ChannelTransform.keep(8, range(2, 8))})
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    biases = {n.name: tuple(n.inputs[2].shape) for n in model.graph if n.op_type == "Conv"}
    assert biases == {"a": (6,), "b": (8,)}
    x = np.random.default_rng(1).random((2, 2, 6, 6), dtype=np.float32)
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=1e-5, atol=1e-5)


EXACT_BUILDERS = [nets.neck_net, nets.upsample_net, nets.attention_net, nets.shared_bias_net,
                  nets.residual_net, nets.concat_net]


@pytest.mark.parametrize("build", EXACT_BUILDERS, ids=lambda b: b.__name__)
def test_removing_zeroed_channels_of_every_group_is_exact(build):
    """Zero some channels of every prunable group in all their producers, then remove them:
    with the coupling right the outputs do not move (split groups, heads and all)."""
    rng = np.random.default_rng(5)
    model = _ir(build(rng))
    graph = analyze(model)
    transforms = {}
    for g in graph.prunable:
        dead = rng.choice(g.size, max(1, g.size // 3), replace=False) if g.size > 1 else []
        nets.kill_channels(graph, g, dead)
        if len(dead):
            transforms[g.id] = ChannelTransform.keep(g.size, np.setdiff1d(range(g.size), dead))
    reference = ir.serde.serialize_model(model)
    shrink(model, graph, transforms)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    shape = [d.dim_value for d in reference.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(6).random((3, *shape), dtype=np.float32)
    np.testing.assert_allclose(_run(out, x), _run(reference, x), rtol=1e-5, atol=1e-5)
    assert profile_model(out).macs < profile_model(reference).macs


def test_removing_dead_heads_and_hidden_units_is_exact():
    """Heads whose q, k, v weights are zero contribute nothing to the attention output:
    removing them from q, k, v and the output projection's rows leaves the model as it was."""
    proto = nets.attention_net(np.random.default_rng(7), dead_heads=(1,), dead_hidden=(0, 5, 9))
    model = _ir(proto)
    graph = analyze(model)
    groups = _by_origin(graph)
    shrink(model, graph, {
        groups["MatMul 'q' in blocks of 4"].id: ChannelTransform.keep(2, [0]),
        groups["MatMul 'ff1'"].id: ChannelTransform.keep(16, np.setdiff1d(range(16), [0, 5, 9])),
    })
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    weights = {v.name: tuple(v.shape) for v in model.graph.initializers.values()}
    assert weights["wq"] == weights["wk"] == weights["wv"] == (8, 4)
    assert weights["wo"] == (4, 8) and weights["w1"] == (8, 13) and weights["w2"] == (13, 8)
    x = np.random.default_rng(8).random((3, 4, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=1e-5, atol=1e-5)


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
    for build in (nets.residual_net, nets.mobile_net, nets.concat_net, nets.transformer_mlp,
                  nets.neck_net, nets.upsample_net, nets.attention_net, nets.layernorm_net,
                  nets.shared_bias_net):
        proto = build(np.random.default_rng(3))
        model = _ir(proto)
        graph = analyze(model)
        shrink(model, graph, {g.id: ChannelTransform.keep(g.size, range(g.size))
                              for g in graph.prunable})
        shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
        x = np.random.default_rng(4).random((2, *shape), dtype=np.float32)
        np.testing.assert_array_equal(_run(model, x), _run(proto, x))


BUILDERS = [nets.residual_net, nets.mobile_net, nets.concat_net, nets.transformer_mlp,
            nets.unsupported_net, nets.neck_net, nets.upsample_net, nets.attention_net,
            nets.layernorm_net, nets.shared_bias_net, nets.refused_net]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
