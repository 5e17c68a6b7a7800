import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from fake_latency import FakeTable, fake_ms

from compressor.errors import OptionError
from compressor.passes.budget import EXCLUDED_REASON
from compressor.passes.calibrate import Calibration
from compressor.passes.svd import LowRankSVDPass, SVDConfig


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def test_full_rank_reproduces_the_model(convnet, rng, built):
    x = rng.random((4, 3, 12, 12), dtype=np.float32)
    for scheme in ("channel", "spatial"):
        result = LowRankSVDPass(SVDConfig(rank=10_000, schemes=(scheme,), allow_costlier=True))(
            convnet.ir()
        )
        changed = {r.name for r in result.changed}
        assert {"conv1", "conv2"} <= changed
        np.testing.assert_allclose(built.run(result.model, x), convnet.run(convnet.proto, x),
                                   rtol=1e-4, atol=1e-4)


def test_gemm_rank_r_is_the_truncated_svd(mlp, rng, built):
    """Data-free SVD of a Gemm is the Eckart-Young best rank-r approximation."""
    w1 = onnx.numpy_helper.to_array(next(i for i in mlp.proto.graph.initializer if i.name == "w1"))
    result = LowRankSVDPass(SVDConfig(rank=4, allow_costlier=True))(mlp.ir())
    rec = {r.name: r for r in result.layers}["fc1"]
    assert rec.detail == "channel rank 4"
    u, s, vt = np.linalg.svd(w1.astype(np.float64))
    expected_w = (u[:, :4] * s[:4]) @ vt[:4]
    weights = _weights(result.model)
    project = next(v for k, v in weights.items() if k.startswith("fc1") and "project" in k)
    lift = next(v for k, v in weights.items() if k.startswith("fc1") and "lift" in k)
    np.testing.assert_allclose(lift @ project, expected_w, atol=1e-4)
    assert rec.error == pytest.approx(np.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2)), rel=1e-6)


def test_data_aware_matches_numpy_optimum_and_beats_data_free(mlp, rng, built):
    # correlated inputs: the weight-optimal factorisation is not the output-optimal one
    mix = rng.standard_normal((16, 16)) * np.linspace(0.05, 3, 16)
    x = (rng.standard_normal((512, 16)) @ mix).astype(np.float32)
    y_ref = built.run(mlp.proto, x)
    errors = {}
    for aware in (False, True):
        calib = Calibration(x) if aware else None
        result = LowRankSVDPass(SVDConfig(rank=3, allow_costlier=True), calib)(mlp.ir())
        y = built.run(result.model, x)
        errors[aware] = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
    assert errors[True] < 0.8 * errors[False]

    # the first layer's output error on the data equals numpy's optimum
    w1 = onnx.numpy_helper.to_array(next(i for i in mlp.proto.graph.initializer if i.name == "w1"))
    result = LowRankSVDPass(SVDConfig(rank=3, allow_costlier=True), Calibration(x))(mlp.ir())
    xc = x.astype(np.float64) - x.mean(0)
    cov = xc.T @ xc / len(x)
    evals = np.sort(np.linalg.eigvalsh(w1 @ cov @ w1.T))[::-1]
    predicted = np.sqrt(evals[3:].sum() / evals.sum())
    rec = {r.name: r for r in result.layers}["fc1"]
    assert rec.error == pytest.approx(predicted, rel=1e-3)
    assert rec.error_basis == "calibration"


def test_conv_channel_factorisation_matches_torch(convnet, rng, built):
    """Data-free channel SVD equals the network with each conv weight replaced by its
    Eckart-Young rank-5 approximation (computed by numpy), run in torch."""
    x = rng.random((3, 3, 12, 12), dtype=np.float32)
    result = LowRankSVDPass(SVDConfig(rank=5, schemes=("channel",)))(convnet.ir())
    rec = {r.name: r for r in result.layers}
    assert rec["conv1"].detail == rec["conv2"].detail == rec["fc"].detail == "channel rank 5"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in convnet.proto.graph.initializer}

    def rank5(w):
        u, s, vt = np.linalg.svd(w.reshape(len(w), -1).astype(np.float64))
        return torch.tensor(((u[:, :5] * s[:5]) @ vt[:5]).reshape(w.shape), dtype=torch.float32)

    t = torch.from_numpy(x)
    a = F.relu(F.conv2d(t, rank5(inits["c1w"]), torch.tensor(inits["c1b"]), padding=1))
    b = F.relu(F.conv2d(a, rank5(inits["c2w"]), torch.tensor(inits["c2b"]), padding=1, stride=2))
    d = F.conv2d(b, torch.tensor(inits["dww"]), padding=1, groups=24)
    y = d.flatten(1) @ rank5(inits["fw"]).T + torch.tensor(inits["fb"])
    np.testing.assert_allclose(built.run(result.model, x), y.numpy(), rtol=1e-4, atol=1e-4)


def test_ratio_is_met_and_reported(convnet, rng):
    x = rng.random((64, 3, 12, 12), dtype=np.float32)
    result = LowRankSVDPass(SVDConfig(ratio=0.6, rank_multiple=1), Calibration(x))(convnet.ir())
    assert result.stats["ratio_reached"] <= 0.6
    assert result.stats["macs_after"] == pytest.approx(
        result.stats["macs_before"] - sum(r.macs_before - r.macs_after for r in result.layers)
    )
    onnx.checker.check_model(ir.serde.serialize_model(result.model))


def test_skips_depthwise_and_unprofitable_layers_with_reasons(convnet):
    result = LowRankSVDPass(SVDConfig(ratio=0.9))(convnet.ir())
    rec = {r.name: r for r in result.layers}
    assert "depthwise conv (group=24)" in rec["dw"].skipped
    # conv1 (3 -> 16 channels, 27 inputs): no rank saves MACs
    assert rec["conv1"].skipped == "factorised form is not cheaper than dense"
    assert "no calibration data" in result.notes[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, r"--ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, r"--ratio must be in \(0, 1\]"),
        ({"rank": 0}, "--rank must be >= 1"),
        ({"energy": 2.0}, r"--energy must be in \(0, 1\]"),
        ({"schemes": ("diagonal",)}, "SVD schemes must be among"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(OptionError, match=message):
        SVDConfig(**kwargs)


def test_energy_mode_keeps_requested_energy(mlp):
    result = LowRankSVDPass(SVDConfig(energy=0.9, allow_costlier=True))(mlp.ir())
    for rec in result.changed:
        assert rec.error**2 <= 0.1 + 1e-9


def test_repr_shows_config():
    text = repr(LowRankSVDPass(SVDConfig(ratio=0.25)))
    assert text.startswith("LowRankSVDPass(ratio=0.25, rank=None")



def test_sequential_refit_lowers_the_network_error(deep_mlp, rng, built):
    """Asymmetric reconstruction fits each layer to its compressed inputs: on the calibration
    data the final output error is lower than fitting every layer to the original inputs."""
    x = (rng.standard_normal((1024, 24)) * np.linspace(0.1, 2, 24)).astype(np.float32)
    y_ref = built.run(deep_mlp.proto, x)
    errors = {}
    for sequential in (False, True):
        cfg = SVDConfig(ratio=0.45, rank_multiple=1, sequential=sequential)
        result = LowRankSVDPass(cfg, Calibration(x))(deep_mlp.ir())
        refitted = [r.name for r in result.layers if "refit" in r.detail]
        assert bool(refitted) is sequential
        y = built.run(result.model, x)
        errors[sequential] = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
    assert errors[True] < errors[False]


def test_spatial_refit_lowers_the_error(convnet, rng, built):
    """Spatial SVD is data-free; refitting its 1 x k stage on calibration data must help."""
    x = rng.random((96, 3, 12, 12), dtype=np.float32)
    y_ref = built.run(convnet.proto, x)
    errors = {}
    for sequential in (False, True):
        cfg = SVDConfig(rank=8, schemes=("spatial",), rank_multiple=1, sequential=sequential)
        result = LowRankSVDPass(cfg, Calibration(x))(convnet.ir())
        assert any(r.detail.endswith("refit") for r in result.layers) is sequential
        errors[sequential] = np.linalg.norm(built.run(result.model, x) - y_ref) / np.linalg.norm(
            y_ref)
    assert errors[True] < errors[False]


def test_finer_rank_multiples_when_the_ratio_needs_them(convnet, rng):
    x = rng.random((64, 3, 12, 12), dtype=np.float32)
    result = LowRankSVDPass(SVDConfig(ratio=0.6), Calibration(x))(convnet.ir())
    assert result.stats["ratio_reached"] <= 0.6
    assert any("finer than multiples of 16" in note for note in result.notes)


# ----------------------------------------------------------------------------- by measured time


def _ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(onnx.ModelProto.FromString(proto.SerializeToString()))


CONV2 = "/features/3/Conv"  # lenet5's 6 -> 16 channel 5 x 5 conv on 14 x 14 inputs


def test_speedup_meets_the_measured_budget_on_a_zoo_model(lenet5):
    table = FakeTable()
    result = LowRankSVDPass(SVDConfig(ratio=1.0, speedup=1.15), latency=table)(_ir(lenet5))
    stats = result.stats
    before = fake_ms(lenet5)
    assert stats["latency_ms_before"] == pytest.approx(before)
    assert stats["predicted_latency_ms"] <= before / 1.15 + 1e-12
    assert stats["predicted_speedup"] == pytest.approx(before / stats["predicted_latency_ms"])
    # the prediction is the same rule applied to the compressed model (the rule is additive)
    out = ir.serde.serialize_model(result.model)
    assert fake_ms(out) == pytest.approx(stats["predicted_latency_ms"], rel=1e-9)
    assert not any("not reachable" in n for n in result.notes)
    changed = result.changed
    assert changed
    for record in changed:
        assert record.latency_after_ms < record.latency_before_ms
    assert stats["latency_cache_misses"] == table.misses and table.hits == 0
    # again on the same table: every candidate comes from the cache, the same choices
    again = LowRankSVDPass(SVDConfig(ratio=1.0, speedup=1.15), latency=table)(_ir(lenet5))
    assert again.stats["latency_cache_misses"] == 0
    assert again.stats["latency_cache_hits"] == stats["latency_cache_misses"]
    assert [r.detail for r in again.layers] == [r.detail for r in result.layers]


def test_an_option_measured_slower_than_dense_is_never_chosen(lenet5):
    def slow_conv2_forms(layer):  # conv2's factorised stages read its 6-channel 14 x 14 input
        factorised = layer.weight_shape != (16, 6, 5, 5)
        return 1.0 if layer.op == "Conv" and layer.input_shape[1:] == (6, 14, 14) and \
            factorised else 0.0

    plain = LowRankSVDPass(SVDConfig(ratio=1.0, speedup=1.05), latency=FakeTable())(_ir(lenet5))
    assert {r.name: r for r in plain.layers}[CONV2].changed  # chosen when it is faster
    result = LowRankSVDPass(SVDConfig(ratio=1.0, speedup=1.05),
                            latency=FakeTable(slow_conv2_forms))(_ir(lenet5))
    conv2 = {r.name: r for r in result.layers}[CONV2]
    assert conv2.skipped.startswith("kept dense: every factorised form measured slower than "
                                    "dense (fastest 1.")
    assert conv2.latency_after_ms == conv2.latency_before_ms
    assert any(r.changed for r in result.layers)  # the others still meet the target
    assert result.stats["predicted_latency_ms"] <= fake_ms(lenet5) / 1.05
    convs = [n for n in result.model.graph if n.op_type == "Conv"]
    assert len(convs) == 2 and convs[1].name == CONV2
    # even when the target is out of reach the slower forms stay out
    hopeless = LowRankSVDPass(SVDConfig(ratio=1.0, speedup=3.0),
                              latency=FakeTable(slow_conv2_forms))(_ir(lenet5))
    assert {r.name: r for r in hopeless.layers}[CONV2].skipped.startswith("kept dense")


def test_exclude_keeps_a_layer_dense(lenet5):
    for cfg in (SVDConfig(ratio=1.0, speedup=1.15, exclude=frozenset({CONV2})),
                SVDConfig(ratio=0.5, exclude=frozenset({CONV2}))):
        result = LowRankSVDPass(cfg, latency=FakeTable())(_ir(lenet5))
        conv2 = {r.name: r for r in result.layers}[CONV2]
        assert conv2.skipped == EXCLUDED_REASON
        assert conv2.macs_after == conv2.macs_before
        node = next(n for n in result.model.graph if n.name == CONV2)
        weight_name = next(n.input[1] for n in lenet5.graph.node if n.name == CONV2)
        original = next(i for i in lenet5.graph.initializer if i.name == weight_name)
        np.testing.assert_array_equal(node.inputs[1].const_value.numpy(),
                                      onnx.numpy_helper.to_array(original))
        assert any(r.changed for r in result.layers)


def test_speedup_and_ratio_must_both_hold(lenet5):
    table = FakeTable()
    time_only = LowRankSVDPass(SVDConfig(ratio=1.0, speedup=1.05), latency=table)(_ir(lenet5))
    both = LowRankSVDPass(SVDConfig(ratio=0.85, speedup=1.05), latency=table)(_ir(lenet5))
    assert time_only.stats["ratio_reached"] > 0.85  # so the MACs cap binds
    assert both.stats["ratio_reached"] <= 0.85
    assert both.stats["predicted_latency_ms"] <= fake_ms(lenet5) / 1.05
    assert fake_ms(ir.serde.serialize_model(both.model)) == pytest.approx(
        both.stats["predicted_latency_ms"], rel=1e-9)


def test_unreachable_speedup_takes_the_fastest_forms_and_says_so(lenet5):
    table = FakeTable()
    result = LowRankSVDPass(SVDConfig(ratio=1.0, speedup=3.0), latency=table)(_ir(lenet5))
    (note,) = [n for n in result.notes if "not reachable" in n]
    predicted = result.stats["predicted_speedup"]
    assert note.startswith(f"speedup 3 not reachable by svd alone: predicted {predicted:.2f}x")
    for record in result.layers:
        if record.latency_before_ms is not None and record.changed:
            # nothing faster was on offer for this layer
            assert record.latency_after_ms < record.latency_before_ms


def test_without_speedup_nothing_is_timed(lenet5):
    table = FakeTable()
    timed = LowRankSVDPass(SVDConfig(ratio=0.5), latency=table)(_ir(lenet5))
    plain = LowRankSVDPass(SVDConfig(ratio=0.5))(_ir(lenet5))
    assert (table.hits, table.misses) == (0, 0)
    def untimed(stats):  # wall-clock seconds differ run to run
        return {k: v for k, v in stats.items() if k != "seconds_by_stage"}

    assert untimed(timed.stats) == untimed(plain.stats)
    assert "predicted_latency_ms" not in timed.stats
    assert [r.as_dict() for r in timed.layers] == [r.as_dict() for r in plain.layers]
    assert all(r.latency_before_ms is None for r in timed.layers)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_candidates_are_the_forms_the_pass_writes(convnet, scheme):
    """The timing model of a factorised conv has the nodes (ops, attributes, weight shapes)
    the rewrite puts in the model, on the layer's real input at the table's batch, and the
    Relu that follows the layer."""
    result = LowRankSVDPass(SVDConfig(rank=8, schemes=(scheme,)))(convnet.ir())
    written = [n for n in result.model.graph if n.name.startswith("conv2_svd8")]
    assert len(written) == 2

    def describe(node_proto, weights):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node_proto.attribute}
        return node_proto.op_type, attrs, weights[node_proto.input[1]]

    out = ir.serde.serialize_model(result.model)
    out_weights = {i.name: tuple(i.dims) for i in out.graph.initializer}
    expected = [describe(ir.serde.serialize_node(n), out_weights) for n in written]

    from compressor.latency import fused_activation
    from compressor.passes.lowrank import survey
    from compressor.passes.svd import _Choice, _LayerAnalysis

    model = convnet.ir()
    layer = next(a for a in survey(model, None).layers if a.name == "conv2")
    analysis = _LayerAnalysis(layer, np.eye(layer.fan_in), None, SVDConfig(schemes=(scheme,)))
    candidate = analysis.timing_model(_Choice(scheme, 8, 0.0), 4, fused_activation(layer.node),
                                      18)
    weights = {i.name: tuple(i.dims) for i in candidate.graph.initializer}
    assert [describe(n, weights) for n in candidate.graph.node[:2]] == expected
    assert [n.op_type for n in candidate.graph.node[2:]] == ["Relu"]
    dims = [d.dim_value for d in candidate.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 16, 12, 12]
    dense = analysis.timing_model(None, 1, fused_activation(layer.node), 18)
    assert [n.op_type for n in dense.graph.node] == ["Conv", "Relu"]
    assert built_runs(dense) and built_runs(candidate)


def built_runs(proto: onnx.ModelProto) -> bool:
    from compressor import runtime

    sess = runtime.session(proto)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    y = sess.run(None, {sess.get_inputs()[0].name: np.ones(shape, np.float32)})[0]
    return bool(np.all(np.isfinite(y)))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"speedup": 0.5}, "--speedup must be >= 1"),
    ({"speedup": 2.0, "rank": 4}, "cannot be combined with --rank or --energy"),
])
def test_speedup_config_errors(kwargs, message):
    with pytest.raises(OptionError, match=message):
        SVDConfig(**kwargs)


# -- the tool's own cost (issue 12) ---------------------------------------------------------

def test_spatial_errors_equal_the_direct_products():
    """The factored rank errors (one Cholesky, residual updated block by block) equal
    tr(D Sigma D^T) computed directly for each rank."""
    from compressor.passes.svd import _LayerAnalysis

    rng = np.random.default_rng(0)
    o, c, kh, kw = 12, 5, 3, 3
    weight = rng.standard_normal((o, c * kh * kw))
    rows = rng.standard_normal((400, c * kh * kw)) @ rng.standard_normal((45, 45))
    analysis = _LayerAnalysis.__new__(_LayerAnalysis)
    analysis.layer = type("Layer", (), {"weight": weight})()
    analysis.cov = np.cov(rows.T, bias=True)
    a = weight.reshape(o, c, kh, kw).transpose(1, 2, 0, 3).reshape(c * kh, o * kw)
    analysis._spatial = (*np.linalg.svd(a, full_matrices=False), (o, c, kh, kw))
    ranks = [9, 2, 5, 15]
    direct = []
    for r in ranks:
        delta = weight - analysis._spatial_weights(r)[2]
        direct.append(float(np.sum((delta @ analysis.cov) * delta)))
    np.testing.assert_allclose(analysis._spatial_errors(ranks), direct, rtol=1e-6,
                               atol=1e-9 * direct[1])


def test_results_do_not_depend_on_the_calibration_batch_size(lenet5):
    # 160 samples: more than the ranks on offer, so no two ranks tie at zero error (with fewer
    # samples than a Gemm's fan-in, every rank above the sample count is an exact tie)
    x = np.random.default_rng(7).standard_normal((160, 1, 28, 28)).astype(np.float32)
    results = [LowRankSVDPass(SVDConfig(ratio=0.5), calibration=Calibration(x, batch_size=b))(
        _ir(lenet5)) for b in (160, 13)]
    first, second = ([r.as_dict() for r in res.layers] for res in results)
    assert [(r["name"], r["detail"]) for r in first] == [(r["name"], r["detail"]) for r in second]
    for a, b in zip(first, second, strict=True):
        assert a["error"] == pytest.approx(b["error"], rel=1e-3, abs=1e-6)
    weights = [{t.name: onnx.numpy_helper.to_array(t) for t in
                ir.serde.serialize_model(res.model).graph.initializer} for res in results]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        np.testing.assert_allclose(weights[1][name], value, rtol=1e-3,
                                   atol=1e-4 * (np.abs(value).max() + 1e-6), err_msg=name)
    stages = results[0].stats["seconds_by_stage"]
    assert {"survey forward", "survey statistics", "decompositions", "rank options",
            "refit forward", "refit statistics"} <= set(stages)
    assert all(seconds >= 0.0 for seconds in stages.values())
    # the refits walked the network once: a segment per refitted layer and model at most
    stats = results[0].stats
    refitted = sum(1 for r in first if r["detail"] and "refit" in r["detail"])
    assert 0 < stats["refit_segments"] <= 2 * refitted and stats["refit_restarts"] == 0


def test_peak_memory_does_not_grow_with_calibration_samples(lenet5, monkeypatch):
    """Shape, not speed: the svd pass's traced peak with 256 samples stays within a small
    factor of its peak with 64 (batches capped at a few samples' worth of activations)."""
    import tracemalloc

    from compressor.passes import calibrate

    monkeypatch.setattr(calibrate, "MAX_BATCH_BYTES", 256 * 1024)
    peaks = {}
    for n in (64, 256):
        x = np.random.default_rng(n).standard_normal((n, 1, 28, 28)).astype(np.float32)
        calibration = Calibration(x)
        model = _ir(lenet5)
        tracemalloc.start()
        LowRankSVDPass(SVDConfig(ratio=0.5), calibration=calibration)(model)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[256] < 1.3 * peaks[64], peaks


def test_output_eigen_from_the_fan_in_side_equals_the_outputs_side():
    """More outputs than inputs (an expanding 1 x 1 conv): the SVD of W L gives the same
    spectrum and the same rank-r projections as the outputs x outputs eigendecomposition."""
    from compressor.passes.svd import _output_eigen, _solve_ridged

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 12))
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))
    cov = np.cov(x.T, bias=True)
    vals, vecs = _output_eigen(w, cov)
    full = w @ cov @ w.T
    ref_vals, ref_vecs = np.linalg.eigh(full)
    ref_vals, ref_vecs = ref_vals[::-1], ref_vecs[:, ::-1]
    assert vals.shape == (12,) and vecs.shape == (48, 12)
    np.testing.assert_allclose(vals, ref_vals[:12], rtol=1e-8, atol=1e-8 * ref_vals[0])
    for r in (1, 5, 12):
        np.testing.assert_allclose(vecs[:, :r] @ vecs[:, :r].T,
                                   ref_vecs[:, :r] @ ref_vecs[:, :r].T, atol=1e-7)
    b = rng.standard_normal((12, 3))
    np.testing.assert_allclose(_solve_ridged(cov, 1.0, b),
                               np.linalg.solve(cov + np.eye(12), b), rtol=1e-9)
    np.testing.assert_array_equal(cov, np.cov(x.T, bias=True))  # its covariance untouched
    # not definite even ridged: the LU route, which solves it
    np.testing.assert_allclose(_solve_ridged(-np.eye(3), 0.5, b[:3]), -2 * b[:3])
    singular = np.ones((3, 3))  # not definite, and singular with a ridge of -1: LU raises
    with pytest.raises(np.linalg.LinAlgError):
        _solve_ridged(singular - np.eye(3), 1.0, b[:3])
