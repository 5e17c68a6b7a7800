"""CalibrationWalk: each layer's inputs in two models, with each part of each model run once."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper
from two_inputs import two_input_model, two_inputs

from compressor import io, runtime
from compressor.errors import DataError
from compressor.models import zoo
from compressor.passes import walk as walk_module
from compressor.passes.calibrate import Calibration
from compressor.passes.cleanup import CleanupPass
from compressor.passes.graph import constant_array
from compressor.passes.lowrank import find_linear_layers
from compressor.passes.walk import CalibrationWalk
from compressor.profile import static_shapes


def _zoo_model(arch: str) -> ir.Model:
    entry = zoo.get(arch)
    return CleanupPass()(ir.serde.deserialize_model(
        io.load_model(entry.checkpoint, arch=arch).proto)).model


def _everything(model: ir.Model, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The named tensors from one run of the whole model (the reference)."""
    proto = ir.serde.serialize_model(model)
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names
                              if n not in present)
    sess = runtime.session(proto)
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))


def _layers(model: ir.Model):
    shapes, _ = static_shapes(ir.serde.serialize_model(model))
    return find_linear_layers(model, shapes)[0]


def _scale_weight(node: ir.Node, factor: float) -> None:
    """Give a Conv/Gemm node new weights (a new initializer value, as the passes do)."""
    weight = node.inputs[1]
    name = weight.name + "_scaled"
    value = ir.Value(name=name, const_value=ir.tensor(
        (constant_array(weight) * factor).astype(np.float32), name=name))
    node.graph.register_initializer(value)
    node.replace_input_with(1, value)


def _gathered(parts: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.concatenate([p[name] for p in parts])


@pytest.mark.parametrize("arch", ["resnet20", "mobilenetv2"])
def test_inputs_equal_whole_model_runs_as_the_current_model_changes(arch):
    """Walking layer by layer while each layer gets new weights once its input is seen: every
    input equals a whole-model run of the model as it stands, in both models, and every node
    of each model runs once (no restart: residual blocks included)."""
    reference = _zoo_model(arch)
    current = _zoo_model(arch)
    reference_proto = ir.serde.serialize_model(reference)
    x = np.random.default_rng(3).standard_normal((11, *zoo.get(arch).input_shape)).astype(
        np.float32)
    ran_nodes = []
    real_session = runtime.session

    def counting_session(proto, *args, **kwargs):
        if proto.graph.name.endswith("_segment"):  # the walk's, not this test's own runs
            ran_nodes.append(len(proto.graph.node))
        return real_session(proto, *args, **kwargs)

    layers = _layers(current)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(walk_module.runtime, "session", counting_session)
        with CalibrationWalk(Calibration(x, batch_size=4), reference_proto) as walk:
            for layer in layers:
                name = layer.input_name
                parts: list[tuple[dict, dict]] = []
                walk.stream(current, [name], [name], lambda a, b, parts=parts: parts.append((a, b)))
                assert [len(a[name]) for a, _ in parts] == [4, 4, 3]
                want_ref = _everything(reference, [name], x)[name]
                want_now = _everything(current, [name], x)[name]
                np.testing.assert_allclose(_gathered([a for a, _ in parts], name), want_ref,
                                           rtol=1e-5, atol=1e-5, err_msg=layer.name)
                np.testing.assert_allclose(_gathered([b for _, b in parts], name), want_now,
                                           rtol=1e-5, atol=1e-5, err_msg=layer.name)
                _scale_weight(layer.node, 0.5)  # where the walk has not been yet
            assert walk.restarts == 0
            assert walk.stored_bytes_peak > 0
    total = len(list(reference.graph))
    # each model's nodes before its last layer, once each (none run twice)
    assert sum(ran_nodes) <= 2 * total


def test_a_change_behind_the_walk_restarts_that_model(convnet):
    """New weights for a node the walk already ran: the walk starts that model again from its
    inputs, so later tensors reflect the change."""
    model = ir.serde.deserialize_model(convnet.proto)
    x = np.random.default_rng(0).standard_normal((6, 3, 12, 12)).astype(np.float32)
    conv1 = next(n for n in model.graph if n.name == "conv1")
    with CalibrationWalk(Calibration(x, batch_size=4), convnet.proto) as walk:
        walk.stream(model, [], ["br"], lambda a, b: None)  # runs conv1 and conv2
        _scale_weight(conv1, 2.0)
        got: list[dict] = []
        walk.stream(model, ["d"], ["d"], lambda a, b: got.append(b))
        assert walk.restarts == 1
    np.testing.assert_allclose(_gathered(got, "d"), _everything(model, ["d"], x)["d"],
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(_gathered(got, "d"), _everything(
        ir.serde.deserialize_model(convnet.proto), ["d"], x)["d"])


def test_a_dropped_tensor_asked_again_restarts_and_is_right(convnet):
    model = ir.serde.deserialize_model(convnet.proto)
    x = np.random.default_rng(1).standard_normal((5, 3, 12, 12)).astype(np.float32)
    with CalibrationWalk(Calibration(x, batch_size=2), convnet.proto) as walk:
        walk.stream(model, [], ["d"], lambda a, b: None)  # 'ar' is read by nothing still to run
        got: list[dict] = []
        walk.stream(model, [], ["ar"], lambda a, b: got.append(b))
        assert walk.restarts == 1
    np.testing.assert_allclose(_gathered(got, "ar"), _everything(model, ["ar"], x)["ar"],
                               rtol=1e-6)


def test_several_inputs_integer_tensors_and_files(monkeypatch):
    """A model with a float and an integer input: the stored frontier keeps each tensor's type,
    goes through files (the default), and the folder is gone after close."""
    inputs = two_inputs(7)
    model = ir.serde.deserialize_model(two_input_model(deep=True))
    walk = CalibrationWalk(Calibration(inputs, batch_size=3), two_input_model(deep=True))
    firsts: list[dict] = []
    walk.stream(model, ["s"], ["h"], lambda a, b: firsts.append(b))
    assert walk._store._folder is not None and any(walk._store._folder.iterdir())
    folder = walk._store._folder
    assert walk._current.live["h"] == np.int64
    seconds: list[dict] = []
    walk.stream(model, ["y"], ["y", "x"], lambda a, b: seconds.append((a, b)))
    walk.close()
    assert not folder.exists()
    np.testing.assert_array_equal(_gathered(firsts, "h"), inputs["ids"] + 1)
    want = (inputs["x"] * 2 + inputs["ids"]) * (inputs["ids"] + 1)
    np.testing.assert_allclose(_gathered([b for _, b in seconds], "y"), want, rtol=1e-6)
    np.testing.assert_allclose(_gathered([a for a, _ in seconds], "y"), want, rtol=1e-6)
    np.testing.assert_array_equal(_gathered([b for _, b in seconds], "x"), inputs["x"])


def test_memory_budget_keeps_small_frontiers_in_memory():
    model = ir.serde.deserialize_model(two_input_model(deep=True))
    with CalibrationWalk(Calibration(two_inputs(4)), two_input_model(deep=True),
                         memory_bytes=2**20) as walk:
        walk.stream(model, [], ["s"], lambda a, b: None)
        assert walk._store._folder is None and walk._store.memory_used > 0


def test_errors_name_the_tensor_and_the_model(convnet):
    model = ir.serde.deserialize_model(convnet.proto)
    x = np.zeros((2, 3, 12, 12), np.float32)
    with CalibrationWalk(Calibration(x), convnet.proto) as walk:
        with pytest.raises(DataError, match="no tensor named 'nope' to observe"):
            walk.stream(model, [], ["nope"], lambda a, b: None)
        walk.stream(model, [], ["a"], lambda a, b: None)
        with pytest.raises(ValueError, match="follows one current model"):
            walk.stream(ir.serde.deserialize_model(convnet.proto), [], ["a"], lambda a, b: None)


def test_the_store_writes_behind_and_reads_back_what_it_was_given():
    store = walk_module._Store(memory_bytes=0, max_pending=1)
    arrays = {("current", f"t{i}", 0): np.full((64, 64), i, np.float32) for i in range(4)}
    for key, array in arrays.items():
        store.put(key, array)
        assert len(store._pending) <= 1  # the oldest writes waited for
    for key, array in arrays.items():
        np.testing.assert_array_equal(store.get(key), array)
    store._settle(0)
    assert not store._pending and len(list(store._folder.iterdir())) == 4
    for key, array in arrays.items():  # from the files now
        np.testing.assert_array_equal(store.get(key), array)
    store.drop("current", "t0")
    assert len(list(store._folder.iterdir())) == 3
    folder = store._folder
    store.close()
    assert not folder.exists()


def test_a_failed_frontier_write_is_a_clear_error(monkeypatch):
    def full_disk(path, array, allow_pickle=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(walk_module.np, "save", full_disk)
    store = walk_module._Store(memory_bytes=0)
    # raised by whichever call meets the finished write first: this put, or the close
    with pytest.raises(DataError, match="could not store a frontier tensor .*No space left"):
        try:
            store.put(("reference", "x", 0), np.zeros(8, np.float32))
        finally:
            folder = store._folder
        store.close()
    store.close()
    assert folder is not None and not folder.exists()
