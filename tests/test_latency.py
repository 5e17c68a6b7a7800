"""The latency machinery: context keys, the on-disk cache, the table's timing and caching,
graph signatures, and the candidate models that time a layer in its context."""

import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import latency, runtime
from compressor.errors import OptionError, UnsupportedModelError
from compressor.latency import (
    LatencyCache,
    LatencyContext,
    LatencyTable,
    activation_nodes,
    candidate_model,
    filler,
    fused_activation,
    graph_signature,
)


def _gemm_model(outputs=16, inputs=6, seed=0, batch="N", names=("x", "w", "b", "h", "y")):
    rng = np.random.default_rng(seed)
    x, w, b, h, y = names
    nodes = [helper.make_node("Gemm", [x, w, b], [h], transB=1, name="fc"),
             helper.make_node("Relu", [h], [y], name="relu")]
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, inputs])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [batch, outputs])],
        [numpy_helper.from_array(rng.standard_normal((outputs, inputs)).astype(np.float32), w),
         numpy_helper.from_array(rng.standard_normal(outputs).astype(np.float32), b)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


class CountingTable(LatencyTable):
    """Times by a fixed rule (the number of nodes) and counts real measurements."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.measured = []

    def measure(self, proto, min_time_s):
        self.measured.append(min_time_s)
        return 0.5 + len(proto.graph.node)


@pytest.fixture
def cache_path(tmp_path):
    return tmp_path / "cache" / "latency.json"


# ----------------------------------------------------------------------------- context


def test_context_key_names_machine_runtime_and_settings():
    key = LatencyContext(threads=2, batch=8).key()
    assert key["onnxruntime"] == onnxruntime.__version__
    assert key["logical_cores"] == os.cpu_count()
    assert key["cpu"] and key["provider"] == "cpu"
    assert (key["threads"], key["batch"]) == (2, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch=0), "--batch must be >= 1"),
    (dict(threads=0), "--threads must be >= 1"),
    (dict(provider="tpu"), "unknown provider 'tpu'"),
])
def test_context_errors(kwargs, message):
    with pytest.raises(OptionError, match=message):
        LatencyContext(**kwargs)


def test_default_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(latency.CACHE_DIR_ENV, str(tmp_path))
    assert LatencyCache().path == tmp_path / "latency.json"
    monkeypatch.delenv(latency.CACHE_DIR_ENV)
    assert LatencyCache().path == latency.Path.home() / ".cache" / "compressor" / "latency.json"


# ----------------------------------------------------------------------------- cache


def test_cache_hit_miss_and_persistence(cache_path):
    key = LatencyContext().key()
    cache = LatencyCache(cache_path)
    assert cache.get(key, "sig") is None
    cache.put(key, "sig", 1.25)
    assert cache.get(key, "sig") == 1.25
    assert cache.get(key, "other") is None
    cache.save()
    stored = json.loads(cache_path.read_text())
    assert stored["format"] == latency.CACHE_FORMAT
    assert [e["ms"] for e in stored["entries"].values()] == [1.25]
    assert LatencyCache(cache_path).get(key, "sig") == 1.25  # a new process reads it back


@pytest.mark.parametrize("change", [dict(batch=4), dict(threads=1), dict(provider="cuda")])
def test_cache_key_changes_with_batch_threads_provider(cache_path, change):
    cache = LatencyCache(cache_path)
    base = LatencyContext()
    cache.put(base.key(), "sig", 2.0)
    changed = LatencyContext(**{**dict(provider="cpu", threads=None, batch=1), **change})
    assert changed.key() != base.key()
    assert cache.get(changed.key(), "sig") is None
    assert cache.get(LatencyContext().key(), "sig") == 2.0


def test_cache_key_changes_with_the_onnxruntime_version(cache_path, monkeypatch):
    cache = LatencyCache(cache_path)
    cache.put(LatencyContext().key(), "sig", 2.0)
    latency._machine.cache_clear()
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    try:
        key = LatencyContext().key()
        assert key["onnxruntime"] == "0.0.1"
        assert cache.get(key, "sig") is None
    finally:
        latency._machine.cache_clear()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99, "entries": {}}),
                                     json.dumps({"format": 1, "entries": {"k": {"ms": "x"}}})])
def test_corrupt_cache_warns_starts_empty_and_is_rewritten(cache_path, content):
    cache_path.parent.mkdir(parents=True)
    cache_path.write_text(content)
    cache = LatencyCache(cache_path)
    key = LatencyContext().key()
    with pytest.warns(UserWarning, match="latency cache .* is unreadable"):
        assert cache.get(key, "sig") is None
    cache.put(key, "sig", 3.0)
    cache.save()
    assert LatencyCache(cache_path).get(key, "sig") == 3.0


def test_save_is_atomic_and_leaves_no_temporary_file(cache_path, monkeypatch):
    key = LatencyContext().key()
    first = LatencyCache(cache_path)
    first.put(key, "a", 1.0)
    first.save()
    before = cache_path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    second = LatencyCache(cache_path)
    second.put(key, "b", 2.0)
    monkeypatch.setattr(latency.os, "replace", crash)
    with pytest.warns(UserWarning, match="cannot write the latency cache"):
        second.save()
    assert cache_path.read_bytes() == before  # the old file is whole
    assert sorted(p.name for p in cache_path.parent.iterdir()) == ["latency.json"]
    assert second.get(key, "b") == 2.0  # still known to this run


def test_concurrent_writers_merge(cache_path):
    key = LatencyContext().key()
    a, b = LatencyCache(cache_path), LatencyCache(cache_path)
    a.get(key, "x"), b.get(key, "x")  # both read the (missing) file first
    a.put(key, "from-a", 1.0)
    a.save()
    b.put(key, "from-b", 2.0)
    b.save()
    merged = LatencyCache(cache_path)
    assert merged.get(key, "from-a") == 1.0 and merged.get(key, "from-b") == 2.0


def test_memory_only_cache_writes_nothing(cache_path):
    cache = LatencyCache(cache_path, persistent=False)
    cache.put(LatencyContext().key(), "sig", 1.0)
    cache.save()
    assert cache.get(LatencyContext().key(), "sig") == 1.0
    assert not cache_path.exists()


# ----------------------------------------------------------------------------- signatures


def test_signature_ignores_names_and_weight_values_not_shapes():
    base = graph_signature(_gemm_model())
    renamed = _gemm_model(seed=1, names=("in", "W", "B", "mid", "out"))
    assert graph_signature(renamed) == base
    assert graph_signature(_gemm_model(outputs=24)) != base
    assert graph_signature(_gemm_model(batch=4)) != base


def test_signature_keeps_small_constant_values():
    def clip(high):
        nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])]
        graph = helper.make_graph(
            nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
            [numpy_helper.from_array(np.float32(0), "lo"),
             numpy_helper.from_array(np.float32(high), "hi")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    assert graph_signature(clip(6.0)) != graph_signature(clip(1.0))


# ----------------------------------------------------------------------------- the table


def test_time_is_finite_positive_and_cached(cache_path):
    table = LatencyTable(cache=LatencyCache(cache_path), min_time_s=0.01)
    model = _gemm_model()
    ms = table.time(model)
    assert np.isfinite(ms) and ms > 0
    assert (table.hits, table.misses) == (0, 1)
    assert table.time(_gemm_model(seed=5)) == ms  # same shapes: a hit, whatever the weights
    assert (table.hits, table.misses) == (1, 1)
    again = LatencyTable(cache=LatencyCache(cache_path))
    assert again.time(model) == ms and again.hits == 1  # from disk


def test_time_with_a_builder_builds_only_on_a_miss(cache_path):
    table = CountingTable(cache=LatencyCache(cache_path))
    built = []

    def build():
        built.append(1)
        return _gemm_model()

    with pytest.raises(TypeError, match="explicit signature"):
        table.time(build)
    assert table.time(build, "gemm-16x6") == 2.5
    assert table.time(build, "gemm-16x6") == 2.5
    assert len(built) == 1 and table.measured == [table.min_time_s]
    table.time(_gemm_model(outputs=3), min_time_s=0.3)
    assert table.measured[-1] == 0.3


def test_time_at_the_context_batch(cache_path):
    table = LatencyTable(LatencyContext(batch=4), LatencyCache(cache_path), min_time_s=0.0)
    assert table.time(_gemm_model(batch=4)) > 0
    with pytest.raises(OptionError, match="input 'x' has a fixed batch size of 2: it cannot be "
                                          "timed at batch 4"):
        table.time(_gemm_model(batch=2))


def test_time_refuses_symbolic_feature_dims(cache_path):
    model = _gemm_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "F"
    with pytest.raises(UnsupportedModelError, match="input 'x' has a symbolic dimension 1"):
        LatencyTable(cache=LatencyCache(cache_path)).time(model)


def test_compare_times_side_by_side_and_never_caches(cache_path):
    table = LatencyTable(cache=LatencyCache(cache_path))
    result = table.compare({"small": _gemm_model(outputs=4), "large": _gemm_model(outputs=64)},
                           min_time_s=0.02)
    assert set(result) == {"small", "large"}
    assert all(np.isfinite(v) and v > 0 for v in result.values())
    assert (table.hits, table.misses) == (0, 0) and not cache_path.exists()
    x = np.ones((3, 6), np.float32)
    assert set(table.compare({"a": _gemm_model()}, {"x": x}, min_time_s=0.0)) == {"a"}


def test_time_all_times_each_candidate_beside_the_reference_and_caches_each(cache_path,
                                                                           monkeypatch):
    """The reference alone, then each uncached candidate side by side with it, scaled by the
    reference's own time: a candidate measured at 3x the reference beside it is 3x the
    reference's single timing, whatever both measured side by side."""
    table = LatencyTable(cache=LatencyCache(cache_path), min_time_s=0.01)
    reference, small, large = _gemm_model(outputs=64), _gemm_model(outputs=4), _gemm_model(outputs=512)
    cached_small = table.time(small)
    monkeypatch.setattr(LatencyTable, "measure", lambda self, proto, min_time_s: 2.0)
    calls = []

    def median(self, models, feeds, min_time_s):
        calls.append((len(models), min_time_s))
        return {"0": 10.0, "1": 30.0}  # side by side: the candidate 3x the reference

    monkeypatch.setattr(LatencyTable, "_median", median)
    import compressor.latency as module

    monkeypatch.setattr(module, "_TABLE_MEASURE", LatencyTable.measure)  # not a test's measure
    times = table.time_all([reference, small, large])
    assert times == [2.0, cached_small, pytest.approx(6.0)]
    assert calls == [(2, pytest.approx(0.02))]  # only the uncached candidate, beside the reference
    assert (table.hits, table.misses) == (1, 3)
    again = LatencyTable(cache=LatencyCache(cache_path))
    assert again.time_all([reference, large]) == [2.0, pytest.approx(6.0)] and again.hits == 2


def test_time_all_runs_for_real_and_goes_through_a_substituted_measure(cache_path):
    table = LatencyTable(cache=LatencyCache(cache_path), min_time_s=0.01)
    times = table.time_all([_gemm_model(outputs=8), _gemm_model(outputs=256)])
    assert all(np.isfinite(t) and t > 0 for t in times)
    counting = CountingTable(cache=LatencyCache(cache_path.with_name("other.json")), min_time_s=0.2)
    assert counting.time_all([_gemm_model(outputs=3), _gemm_model(outputs=5)]) == [2.5, 2.5]
    assert counting.measured == [pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.2)]


# ----------------------------------------------------------------------------- candidates


def test_candidate_model_runs_and_matches_numpy():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal(5).astype(
        np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["z"], transB=1),
             helper.make_node("Relu", ["z"], ["y"])]
    model = candidate_model(nodes, {"x": ((3, 7), np.float32)}, ["y"], {"w": w, "b": b}, 18)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == latency.CANDIDATE_IR_VERSION
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = rng.standard_normal((3, 7)).astype(np.float32)
    y = runtime.session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, np.maximum(x @ w.T + b, 0), rtol=1e-5, atol=1e-5)


def test_filler_is_deterministic_and_shaped():
    a = filler((3, 4, 5))
    assert a.shape == (3, 4, 5) and a.dtype == np.float32
    np.testing.assert_array_equal(a, filler((3, 4, 5)))
    assert np.std(a) > 0


def _ir_graph(nodes, inits, width=4):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y",)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return ir.serde.deserialize_model(model)


def test_fused_activation_only_when_it_is_the_only_user():
    w = np.eye(4)
    clip = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"),
            helper.make_node("Clip", ["h", "lo", "hi"], ["y"], name="clip")]
    model = _ir_graph(clip, {"w": w, "lo": 0.0, "hi": 0.5})
    fc = next(n for n in model.graph if n.name == "fc")
    act = fused_activation(fc)
    assert act is not None and act.op_type == "Clip"

    nodes, inits, out = activation_nodes(act, "z", "out")
    assert out == "out" and sorted(inits) == ["act_1", "act_2"]
    candidate = candidate_model(
        [helper.make_node("Identity", ["x"], ["z"]), *nodes], {"x": ((1, 4), np.float32)},
        [out], inits, 18)
    x = np.array([[-1.0, 0.25, 0.75, 2.0]], np.float32)
    np.testing.assert_array_equal(runtime.session(candidate).run(None, {"x": x})[0],
                                  np.clip(x, 0.0, 0.5))
    assert activation_nodes(None, "z") == ([], {}, "z")

    shared = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"),
              helper.make_node("Relu", ["h"], ["r"], name="relu"),
              helper.make_node("Add", ["r", "h"], ["y"], name="add")]
    model = _ir_graph(shared, {"w": w})
    assert fused_activation(next(n for n in model.graph if n.name == "fc")) is None
    tanh_then_add = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"),
                     helper.make_node("Add", ["h", "h"], ["y"], name="add")]
    model = _ir_graph(tanh_then_add, {"w": w})
    assert fused_activation(next(n for n in model.graph if n.name == "fc")) is None


def test_time_feeds_every_input_of_its_dtype(cache_path):
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"]),
             helper.make_node("Add", ["rows", "x"], ["y"])]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
                       helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])],
        [numpy_helper.from_array(np.ones((5, 4), np.float32), "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    feeds = latency._random_feeds(model, 2)
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (2, 3)
    assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (2, 3, 4)
    table = LatencyTable(LatencyContext(batch=2), LatencyCache(cache_path), min_time_s=0.0)
    assert table.time(model) > 0
