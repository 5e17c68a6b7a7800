"""evaluate: accuracy, agreement and logit differences against numpy; latency sanity; JSON."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime
from compressor.errors import DataError, ModelLoadError, OptionError
from compressor.evaluate import (
    EvaluationReport,
    LatencyStats,
    cosine_similarities,
    evaluate,
    is_class_logits,
    measure_latency,
    run_outputs,
)
from compressor.report import to_json

IN, HIDDEN, CLASSES = 8, 16, 4
FAST = {"latency_runs": 3, "batch_sizes": (1, 8), "progress": False}


@dataclass
class Data:
    """Stand-in for compressor.data.Dataset (same fields)."""

    x: np.ndarray
    y: np.ndarray | None
    name: str = "test-data"


def mlp_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.standard_normal((HIDDEN, IN)).astype(np.float32),
        "b1": rng.standard_normal(HIDDEN).astype(np.float32),
        "w2": rng.standard_normal((CLASSES, HIDDEN)).astype(np.float32),
        "b2": rng.standard_normal(CLASSES).astype(np.float32),
    }


def mlp_model(w: dict[str, np.ndarray], batch: int | str = "N") -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1, name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def mlp_numpy(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(x.astype(np.float64) @ w["w1"].T + w["b1"], 0)
    return h @ w["w2"].T + w["b2"]


@pytest.fixture
def pair():
    """Reference weights, candidate weights (one layer perturbed), and labelled data."""
    ref = mlp_weights(0)
    cand = dict(
        ref,
        w2=ref["w2"]
        + 0.3 * np.random.default_rng(1).standard_normal(ref["w2"].shape).astype(np.float32),
    )
    x = np.random.default_rng(2).standard_normal((300, IN)).astype(np.float32)
    y = np.random.default_rng(3).integers(0, CLASSES, 300)
    return ref, cand, Data(x, y)


def test_comparison_matches_numpy(pair):
    ref_w, cand_w, data = pair
    report = evaluate(mlp_model(cand_w), reference=mlp_model(ref_w), data=data, **FAST)

    ref_out, cand_out = mlp_numpy(ref_w, data.x), mlp_numpy(cand_w, data.x)
    comp = report.comparison
    assert comp.agreement == pytest.approx(np.mean(ref_out.argmax(1) == cand_out.argmax(1)))
    assert 0.0 < comp.agreement < 1.0  # the perturbation must flip some predictions
    diff = np.abs(ref_out - cand_out)
    assert comp.max_abs_logit_diff == pytest.approx(diff.max(), rel=1e-4)
    assert comp.mean_abs_logit_diff == pytest.approx(diff.mean(), rel=1e-4)
    assert comp.samples == len(data.x)

    assert report.candidate.accuracy == pytest.approx(np.mean(cand_out.argmax(1) == data.y))
    assert report.reference.accuracy == pytest.approx(np.mean(ref_out.argmax(1) == data.y))
    assert comp.accuracy_delta == pytest.approx(
        report.candidate.accuracy - report.reference.accuracy
    )
    assert report.data == "test-data" and report.samples == 300 and report.notes == []


def test_costs_and_ratios(pair):
    ref_w, _, data = pair
    small = dict(ref_w, w1=ref_w["w1"][:8], b1=ref_w["b1"][:8], w2=ref_w["w2"][:, :8])
    report = evaluate(mlp_model(small), reference=mlp_model(ref_w), data=data, **FAST)
    ref_params = IN * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES
    cand_params = IN * 8 + 8 + 8 * CLASSES + CLASSES
    assert report.reference.params == ref_params
    assert report.candidate.params == cand_params
    assert report.reference.macs == IN * HIDDEN + HIDDEN * CLASSES
    assert report.candidate.macs == IN * 8 + 8 * CLASSES
    comp = report.comparison
    assert comp.params_ratio == pytest.approx(cand_params / ref_params)
    assert comp.macs_ratio == pytest.approx(report.candidate.macs / report.reference.macs)
    assert comp.size_ratio == pytest.approx(
        report.candidate.file_bytes / report.reference.file_bytes
    )
    assert comp.size_ratio < 1


def test_identical_models_agree_exactly(pair):
    ref_w, _, data = pair
    report = evaluate(mlp_model(ref_w), reference=mlp_model(ref_w), data=data, **FAST)
    comp = report.comparison
    assert comp.agreement == 1.0
    assert comp.max_abs_logit_diff == 0.0 and comp.mean_abs_logit_diff == 0.0
    assert comp.accuracy_delta == 0.0
    assert comp.params_ratio == comp.macs_ratio == comp.size_ratio == 1.0
    assert set(comp.speedup) == {1, 8} and all(s > 0 for s in comp.speedup.values())


def test_latency_stats_are_sane(pair):
    ref_w, cand_w, data = pair
    report = evaluate(mlp_model(cand_w), reference=mlp_model(ref_w), data=data, **FAST)
    for stats in (report.candidate, report.reference):
        assert set(stats.latency) == {1, 8}
        for batch, lat in stats.latency.items():
            assert lat.batch == batch and lat.runs == 3
            assert 0 < lat.p50_ms <= lat.p95_ms and lat.mean_ms > 0
    for batch, speedup in report.comparison.speedup.items():
        expected = report.reference.latency[batch].p50_ms / report.candidate.latency[batch].p50_ms
        assert speedup == pytest.approx(expected)


def test_without_data_uses_random_inputs(pair):
    ref_w, cand_w, _ = pair
    report = evaluate(mlp_model(cand_w), reference=mlp_model(ref_w), **FAST, random_samples=64)
    assert report.data is None and report.samples == 64
    assert report.candidate.accuracy is None and report.reference.accuracy is None
    assert report.comparison.accuracy_delta is None
    assert any("random" in note and "accuracy not measured" in note for note in report.notes)

    x = np.random.default_rng(0).standard_normal((64, IN), dtype=np.float32)
    expected = np.mean(mlp_numpy(ref_w, x).argmax(1) == mlp_numpy(cand_w, x).argmax(1))
    assert report.comparison.agreement == pytest.approx(expected)


def test_unlabelled_data_and_no_reference(pair):
    _, cand_w, data = pair
    report = evaluate(mlp_model(cand_w), data=Data(data.x, None, "unlabelled"), **FAST)
    assert report.reference is None and report.comparison is None
    assert report.candidate.accuracy is None
    assert any("no labels" in note for note in report.notes)
    assert set(report.candidate.latency) == {1, 8}


def test_report_round_trips_through_json(pair):
    ref_w, cand_w, data = pair
    report = evaluate(mlp_model(cand_w), reference=mlp_model(ref_w), data=data, **FAST)
    loaded = json.loads(to_json(report))
    assert loaded == json.loads(json.dumps(report.to_dict()))
    assert loaded["comparison"]["agreement"] == report.comparison.agreement
    assert loaded["candidate"]["latency"]["8"]["runs"] == 3
    assert loaded["machine"]["provider"] == "cpu" and loaded["machine"]["onnxruntime"]
    assert EvaluationReport.from_dict(loaded) == report


def test_paths_and_file_sizes(tmp_path, pair):
    ref_w, cand_w, data = pair
    cand_path, ref_path = tmp_path / "small.onnx", tmp_path / "ref.onnx"
    onnx.save(mlp_model(cand_w), cand_path)
    onnx.save(mlp_model(ref_w), ref_path)
    report = evaluate(cand_path, reference=str(ref_path), data=data, **FAST)
    assert report.candidate.name == "small" and report.candidate.path == str(cand_path)
    assert report.candidate.file_bytes == os.path.getsize(cand_path)
    assert report.reference.file_bytes == os.path.getsize(ref_path)


def test_external_data_counts_in_file_size(tmp_path, pair):
    ref_w, _, _ = pair
    path = tmp_path / "ext.onnx"
    onnx.save(
        mlp_model(ref_w), path, save_as_external_data=True, location="ext.data", size_threshold=0
    )
    report = evaluate(path, **FAST)
    expected = os.path.getsize(path) + os.path.getsize(tmp_path / "ext.data")
    assert report.candidate.file_bytes == expected


def test_missing_file_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model file"):
        evaluate(tmp_path / "absent.onnx", **FAST)


def test_corrupt_file_is_a_load_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07this is not protobuf")
    with pytest.raises(ModelLoadError, match="broken.onnx: not a readable ONNX model"):
        evaluate(path, **FAST)


def test_data_of_the_wrong_shape_is_a_data_error(pair):
    ref_w, _, _ = pair
    with pytest.raises(
        DataError, match=r"input 'x' has shape \(10, 5\) but the model expects \(N, 8\) float32"
    ):
        evaluate(mlp_model(ref_w), data=Data(np.zeros((10, 5), np.float32), None), **FAST)
    with pytest.raises(DataError, match="10 samples but 3 labels"):
        evaluate(mlp_model(ref_w), data=Data(np.zeros((10, IN), np.float32), np.zeros(3)), **FAST)


def test_reference_with_another_input_shape_is_refused(pair):
    ref_w, _, _ = pair
    other = mlp_weights(0)
    other["w1"] = np.zeros((HIDDEN, IN + 1), np.float32)
    other_model = mlp_model(other)
    other_model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = IN + 1
    with pytest.raises(OptionError, match="not the same model"):
        evaluate(mlp_model(ref_w), reference=other_model, **FAST)


def test_fixed_batch_model_pads_and_times_only_its_batch(pair):
    ref_w, _, data = pair
    report = evaluate(mlp_model(ref_w, batch=1), data=data, **FAST)
    assert set(report.candidate.latency) == {1}
    assert any("fixed batch size of 1" in note for note in report.notes)
    expected = np.mean(mlp_numpy(ref_w, data.x).argmax(1) == data.y)
    assert report.candidate.accuracy == pytest.approx(expected)

    fixed4 = runtime.session(mlp_model(ref_w, batch=4))
    out = run_outputs(fixed4, data.x[:10], batch_size=256)
    np.testing.assert_allclose(out, mlp_numpy(ref_w, data.x[:10]), rtol=1e-4, atol=1e-5)


def test_run_outputs_batches_give_the_same_result(pair):
    ref_w, _, data = pair
    sess = runtime.session(mlp_model(ref_w))
    whole = run_outputs(sess, data.x, batch_size=1000)
    batched = run_outputs(sess, data.x, batch_size=7)
    np.testing.assert_array_equal(whole, batched)
    np.testing.assert_allclose(whole, mlp_numpy(ref_w, data.x), rtol=1e-4, atol=1e-5)


def test_run_outputs_reports_progress(pair):
    ref_w, _, data = pair
    calls = []
    run_outputs(
        runtime.session(mlp_model(ref_w)),
        data.x[:25],
        batch_size=10,
        progress=lambda label, done, total: calls.append((label, done, total)),
        description="ref",
    )
    assert calls == [("ref", 10, 25), ("ref", 20, 25), ("ref", 25, 25)]


class _FakeValue:
    def __init__(self, name, shape, type_="tensor(float)"):
        self.name, self.shape, self.type = name, shape, type_


class _RecordingSession:
    """Records the order of ``run`` calls into a shared log."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def get_inputs(self):
        return [_FakeValue("x", ["N", IN])]

    def get_outputs(self):
        return [_FakeValue("y", ["N", CLASSES])]

    def run(self, outputs, feeds):
        self.log.append((self.name, len(feeds["x"])))
        return [np.zeros((len(feeds["x"]), CLASSES), np.float32)]


def test_measure_latency_alternates_the_order():
    log = []
    sessions = {"a": _RecordingSession("a", log), "b": _RecordingSession("b", log)}
    x = np.zeros((3, IN), np.float32)
    stats = measure_latency(sessions, x, batch_sizes=(2, 5), warmup=1, runs=4)
    timed = [name for name, batch in log if batch == 2][2:]  # after one warm-up call each
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert {batch for _, batch in log} == {2, 5}  # batch 5 repeats the 3 rows
    for name in sessions:
        assert set(stats[name]) == {2, 5}
        assert all(isinstance(s, LatencyStats) and s.runs == 4 for s in stats[name].values())


def test_measure_latency_runs_for_min_time_without_runs():
    log = []
    sessions = {"a": _RecordingSession("a", log)}
    stats = measure_latency(
        sessions, np.zeros((1, IN), np.float32), (1,), warmup=0, min_time_s=0.0, min_runs=6
    )
    assert stats["a"][1].runs == 6


def test_plot_path_writes_a_png(tmp_path, pair):
    pytest.importorskip("matplotlib")
    ref_w, cand_w, data = pair
    path = tmp_path / "figures" / "summary.png"
    evaluate(mlp_model(cand_w), reference=mlp_model(ref_w), data=data, plot_path=path, **FAST)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.png"]  # no temp left


def test_accepts_a_loaded_model(tmp_path, pair):
    """``compressor.io.LoadedModel``-like objects: the proto is used, the source names it."""
    from types import SimpleNamespace

    ref_w, cand_w, data = pair
    path = tmp_path / "ref.onnx"
    onnx.save(mlp_model(ref_w), path)
    loaded = SimpleNamespace(proto=mlp_model(ref_w), source=str(path))
    from_torch = SimpleNamespace(proto=mlp_model(cand_w), source=str(tmp_path / "vgg.pt"))
    report = evaluate(from_torch, reference=loaded, data=data, **FAST)
    assert report.reference.name == "ref" and report.reference.file_bytes == os.path.getsize(path)
    # a non-ONNX source's size would not compare with an ONNX file's: the graph's size is used
    assert report.candidate.name == "vgg"
    assert report.candidate.file_bytes == mlp_model(cand_w).ByteSize()


# ----------------------------------------------------------------------------- several inputs

VOCAB, SEQ, DIM = 11, 5, 3


def token_model(table: np.ndarray, pooled: bool) -> onnx.ModelProto:
    """Gather(table, ids) * mask[..., None]: hidden states (N, SEQ, DIM), or their sum over
    tokens (N, DIM)."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axes"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["hidden" if pooled else "out"]),
    ]
    if pooled:
        nodes.append(helper.make_node("ReduceSum", ["hidden", "one"], ["out"], keepdims=0))
    out_shape = ["N", DIM] if pooled else ["N", SEQ, DIM]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", SEQ]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", SEQ])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(table.astype(np.float32), "table"),
                     numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                     numpy_helper.from_array(np.array([1], np.int64), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def token_numpy(table: np.ndarray, ids: np.ndarray, mask: np.ndarray, pooled: bool):
    hidden = table[ids] * mask[..., None]
    return hidden.sum(1) if pooled else hidden


@dataclass
class TokenData:
    """A Dataset stand-in with arrays by input name."""

    x: np.ndarray
    y: np.ndarray | None
    inputs: dict
    name: str = "tokens.npz"


def token_data(n: int = 40, seed: int = 0) -> TokenData:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (n, SEQ))
    mask = rng.random((n, SEQ)) < 0.8
    return TokenData(ids, None, {"ids": ids, "mask": mask})


def test_run_outputs_feeds_every_input_by_name():
    table = np.random.default_rng(0).standard_normal((VOCAB, DIM))
    data = token_data()
    sess = runtime.session(token_model(table, pooled=False))
    got = run_outputs(sess, data.inputs, batch_size=7)
    np.testing.assert_allclose(got, token_numpy(table, data.x, data.inputs["mask"], False),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match=r"2 inputs \(ids, mask\); pass a dict of arrays"):
        run_outputs(sess, data.x)
    with pytest.raises(DataError, match=r"no array for model input 'mask' \(arrays: ids\)"):
        run_outputs(sess, {"ids": data.x})
    with pytest.raises(DataError, match=r"input 'ids' has dtype float64 but the model expects "
                                        r"\(N, 5\) int64"):
        run_outputs(sess, {"ids": data.x + 0.0, "mask": data.inputs["mask"]})


def test_hidden_states_are_judged_by_cosine_not_agreement():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((VOCAB, DIM))
    noisy = table + 0.3 * rng.standard_normal(table.shape)
    data = token_data()
    report = evaluate(token_model(noisy, False), reference=token_model(table, False), data=data,
                      **FAST)
    comp = report.comparison
    assert comp.output_kind == "features" and comp.agreement is None
    mask = data.inputs["mask"]
    cand, ref = (token_numpy(t, data.x, mask, False) for t in (noisy, table))
    a, b = cand.reshape(len(cand), -1), ref.reshape(len(ref), -1)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert comp.cosine_mean == pytest.approx(cosine.mean(), rel=1e-5)
    assert comp.cosine_min == pytest.approx(cosine.min(), rel=1e-5)
    assert 0 < comp.cosine_min < comp.cosine_mean < 1
    assert comp.max_abs_logit_diff == pytest.approx(np.abs(cand - ref).max(), rel=1e-4)
    assert report.samples == 40 and report.notes == ["data 'tokens.npz' has no labels; "
                                                     "accuracy not measured"]
    loaded = json.loads(to_json(report))
    assert loaded["comparison"]["agreement"] is None
    assert loaded["comparison"]["cosine_min"] == comp.cosine_min
    assert EvaluationReport.from_dict(loaded).comparison.cosine_mean == comp.cosine_mean


def test_logits_get_agreement_and_cosine(pair):
    ref_w, cand_w, data = pair
    comp = evaluate(mlp_model(cand_w), reference=mlp_model(ref_w), data=data, **FAST).comparison
    assert comp.output_kind == "logits" and comp.agreement is not None
    expected = cosine_similarities(mlp_numpy(cand_w, data.x), mlp_numpy(ref_w, data.x))
    assert comp.cosine_mean == pytest.approx(expected.mean(), rel=1e-5)


def test_labels_on_hidden_states_are_not_scored_as_accuracy():
    table = np.random.default_rng(2).standard_normal((VOCAB, DIM))
    data = token_data(12)
    data.y = np.zeros(12, np.int64)
    report = evaluate(token_model(table, False), data=data, **FAST)
    assert report.candidate.accuracy is None
    assert any("not class logits" in note for note in report.notes)


def test_without_data_token_ids_stay_in_the_vocabulary_and_masks_are_ones():
    table = np.random.default_rng(3).standard_normal((VOCAB, DIM))
    model = token_model(table, pooled=True)
    report = evaluate(model, reference=model, **FAST, random_samples=32)
    assert report.comparison.agreement == 1.0
    assert report.comparison.cosine_min == pytest.approx(1.0, abs=1e-12)
    assert any("ids 0..10 (the rows of the table it indexes); mask all ones" in note
               for note in report.notes)
    assert any("no data: 32 random inputs" in note for note in report.notes)


def test_class_logits_rule_and_cosine_edge_cases():
    assert is_class_logits((8, 10)) and not is_class_logits((8, 1))
    assert not is_class_logits((8, 16, 32)) and not is_class_logits((8,))
    a = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 2.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(cosine_similarities(a, b), [1.0, 1.0, 0.0, -1.0])


class _TwoInputSession(_RecordingSession):
    def get_inputs(self):
        return [_FakeValue("ids", ["N", SEQ], "tensor(int64)"),
                _FakeValue("mask", ["N", SEQ], "tensor(bool)")]

    def run(self, outputs, feeds):
        assert feeds["ids"].dtype == np.int64 and feeds["mask"].dtype == np.bool_
        assert len(feeds["ids"]) == len(feeds["mask"])
        self.log.append((self.name, len(feeds["ids"])))
        return [np.zeros((len(feeds["ids"]), CLASSES), np.float32)]


def test_measure_latency_takes_feeds_of_several_inputs():
    log = []
    data = token_data(3)
    stats = measure_latency({"a": _TwoInputSession("a", log)}, data.inputs, batch_sizes=(2, 5),
                            warmup=1, runs=2)
    assert {batch for _, batch in log} == {2, 5}  # batch 5 repeats the 3 rows of both
    assert set(stats["a"]) == {2, 5} and all(s.runs == 2 for s in stats["a"].values())
