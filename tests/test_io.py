"""compressor.io: every source format becomes an ONNX model computing what torch computes;
errors name the file; saves are atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from compressor.errors import ModelLoadError, OptionError, UnsupportedModelError
from compressor.io import (
    LoadedModel,
    export_to_onnx,
    load_model,
    parse_input_shape,
    parse_input_shapes,
    save_model,
)
from compressor.runtime import session

SHAPE = (1, 8, 8)


class TinyNet(nn.Module):
    """Conv -> BN -> ReLU -> Linear on 1x8x8: small enough to export in about a second."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_tiny() -> TinyNet:
    torch.manual_seed(0)
    module = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics, so folding them is visible
        module.bn.running_mean.uniform_(-0.5, 0.5)
        module.bn.running_var.uniform_(0.5, 2.0)
        module.bn.weight.uniform_(0.5, 1.5)
        module.bn.bias.uniform_(-0.5, 0.5)
    return module.eval()


def run_onnx(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = session(proto)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def assert_matches_torch(loaded: LoadedModel, reference: nn.Module, batches=(1, 5)) -> None:
    rng = np.random.default_rng(1)
    for batch in batches:
        x = rng.random((batch, *loaded.input_shape), dtype=np.float32)
        with torch.no_grad():
            expected = reference(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(run_onnx(loaded.proto, x), expected, atol=1e-4, rtol=1e-4)


def assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path, *phrases: str) -> str:
    message = str(exc.value)
    assert str(path) in message
    assert "\n" not in message and "Traceback" not in message
    for phrase in phrases:
        assert phrase in message, message
    return message


@pytest.fixture(scope="module")
def tiny() -> TinyNet:
    return make_tiny()


@pytest.fixture(scope="module")
def tiny_onnx(tiny) -> onnx.ModelProto:
    return export_to_onnx(tiny, SHAPE)


@pytest.fixture(scope="module")
def onnx_file(tiny_onnx, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(tiny_onnx, path)
    return path


# ------------------------------------------------------------------------------- export


def test_export_has_dynamic_batch_and_conservative_versions(tiny, tiny_onnx):
    onnx.checker.check_model(tiny_onnx)
    assert tiny_onnx.ir_version <= 10
    opset = {o.domain: o.version for o in tiny_onnx.opset_import}[""]
    assert opset >= 17
    (graph_input,) = tiny_onnx.graph.input
    assert graph_input.name == "input"
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == list(SHAPE)
    assert [o.name for o in tiny_onnx.graph.output] == ["logits"]
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.random((batch, *SHAPE), dtype=np.float32)
        with torch.no_grad():
            expected = tiny(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(run_onnx(tiny_onnx, x), expected, atol=1e-4, rtol=1e-4)


def test_export_of_training_mode_module_uses_eval_behaviour(capfd):
    module = make_tiny().train()
    proto = export_to_onnx(module, SHAPE)
    assert not module.training
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # the exporter's chatter is silenced
    x = np.random.default_rng(2).random((3, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(proto, x), expected, atol=1e-4, rtol=1e-4)


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def test_export_failure_names_the_module_and_the_cause(capfd):
    with pytest.raises(UnsupportedModelError) as exc:
        export_to_onnx(DataDependent(), SHAPE)
    message = str(exc.value)
    assert message.startswith("cannot export DataDependent with input shape (batch,1,8,8)")
    assert "data-dependent" in message and "\n" not in message
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------------------- formats


def test_load_onnx(onnx_file, tiny):
    loaded = load_model(onnx_file)
    assert loaded.source_format == "onnx"
    assert loaded.source == onnx_file
    assert loaded.input_shape == SHAPE
    assert loaded.input_name == "input"
    assert loaded.torch_module is None
    assert_matches_torch(loaded, tiny)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_load_torchscript(how, tiny, tmp_path):
    path = tmp_path / f"{how}.pt"
    if how == "script":
        scripted = torch.jit.script(tiny)
    else:
        scripted = torch.jit.trace(tiny, torch.rand(2, *SHAPE))
    torch.jit.save(scripted, path)
    loaded = load_model(path, input_shape=SHAPE)
    assert loaded.source_format == "torchscript"
    assert loaded.input_shape == SHAPE
    assert loaded.torch_module is not None
    assert_matches_torch(loaded, tiny)
    assert_matches_torch(loaded, loaded.torch_module, batches=(2,))


def test_load_torchscript_takes_shape_from_calibration_data(tiny, tmp_path):
    path = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(tiny), path)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert str(exc.value) == f"cannot determine the input shape of {path}: pass --input-shape"
    loaded = load_model(path, sample_input_shape=SHAPE)
    assert loaded.input_shape == SHAPE
    assert_matches_torch(loaded, tiny, batches=(3,))


def test_load_torch_export_program(tiny, tmp_path):
    path = tmp_path / "tiny.pt2"
    batch = torch.export.Dim("batch", min=2)  # the guard must not refuse batch 1 later
    program = torch.export.export(tiny, (torch.rand(2, *SHAPE),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    loaded = load_model(path)  # shape from the program's example input
    assert loaded.source_format == "torch.export"
    assert loaded.input_shape == SHAPE
    assert_matches_torch(loaded, tiny)
    assert_matches_torch(loaded, loaded.torch_module)


def test_torch_export_program_with_fixed_batch_is_refused(tiny, tmp_path):
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(tiny, (torch.rand(2, *SHAPE),)), path)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line_naming(exc, path, "fixed batch size", "dynamic_shapes")


def test_pickled_module_needs_trust(tiny, tmp_path):
    path = tmp_path / "module.pt"
    torch.save(tiny, path)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, input_shape=SHAPE)
    assert_one_line_naming(exc, path, "pickled code", "--trust-pickle")
    loaded = load_model(path, input_shape=SHAPE, trust_pickle=True)
    assert loaded.source_format == "pickle"
    assert isinstance(loaded.torch_module, TinyNet)
    assert_matches_torch(loaded, tiny)


def test_state_dict_without_arch_asks_for_it(tiny, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, input_shape=SHAPE)
    message = assert_one_line_naming(exc, path, "state dict", "--arch")
    zoo = pytest.importorskip("compressor.models.zoo")
    assert all(name in message for name in zoo.names())


def test_state_dict_with_arch(tmp_path):
    zoo = pytest.importorskip("compressor.models.zoo")
    entry = zoo.get("lenet5")
    torch.manual_seed(3)
    module = entry.build().eval()
    path = tmp_path / "lenet5.pt"
    torch.save({"state_dict": module.state_dict(), "epoch": 3}, path)  # wrapped checkpoint
    loaded = load_model(path, arch="lenet5")
    assert loaded.source_format == "state_dict"
    assert loaded.input_shape == tuple(entry.input_shape)
    assert_matches_torch(loaded, module)


def test_state_dict_of_another_arch_lists_keys(tiny, tmp_path):
    pytest.importorskip("compressor.models.zoo")
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, arch="lenet5")
    assert_one_line_naming(exc, path, "--arch lenet5", "missing keys", "unexpected keys", "bn.")


def test_bundled_checkpoint_loads_when_present():
    zoo = pytest.importorskip("compressor.models.zoo")
    checkpoint = zoo.get("mlp").checkpoint
    if not checkpoint.is_file():
        pytest.skip(f"{checkpoint} not trained yet")
    loaded = load_model(checkpoint, arch="mlp")
    assert loaded.input_shape == (1, 28, 28)
    assert_matches_torch(loaded, zoo.load_pretrained("mlp"), batches=(4,))


# ---------------------------------------------------------------------- ONNX input shapes


def relu_model(dims, *, ir_version: int = 10, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def test_symbolic_onnx_dims_need_an_input_shape(tmp_path):
    path = tmp_path / "symbolic.onnx"
    onnx.save(relu_model(["N", 1, "H", "W"]), path)
    with pytest.raises(ModelLoadError, match="pass --input-shape") as exc:
        load_model(path)
    assert str(path) in str(exc.value)
    loaded = load_model(path, input_shape=(1, 5, 6))
    dims = loaded.proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N"
    assert [d.dim_value for d in dims[1:]] == [1, 5, 6]
    assert loaded.input_shape == (1, 5, 6) and loaded.input_name == "x"
    x = np.random.default_rng(0).standard_normal((3, 1, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(run_onnx(loaded.proto, x), np.maximum(x, 0))
    assert load_model(path, sample_input_shape=(1, 4, 4)).input_shape == (1, 4, 4)


def test_input_shape_that_contradicts_the_file(onnx_file):
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(onnx_file, input_shape=(1, 9, 9))
    with pytest.raises(ModelLoadError, match="per-sample dimensions"):
        load_model(onnx_file, input_shape=(8, 8))


def test_new_ir_version_is_capped_and_old_opset_upgraded(tmp_path):
    newer = tmp_path / "ir11.onnx"
    onnx.save(relu_model(["N", 3], ir_version=11), newer)
    assert load_model(newer).proto.ir_version == 10
    older = tmp_path / "opset13.onnx"
    onnx.save(relu_model(["N", 3], ir_version=7, opset=13), older)
    proto = load_model(older).proto
    assert {o.domain: o.version for o in proto.opset_import}[""] >= 17
    x = np.array([[-1.0, 0.5, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(run_onnx(proto, x), np.maximum(x, 0))


# ---------------------------------------------------------------------------- error paths


def test_missing_file(tmp_path):
    path = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line_naming(exc, path, "no such file")


def test_directory(tmp_path):
    path = tmp_path / "dir.onnx"
    path.mkdir()
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line_naming(exc, path, "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.touch()
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line_naming(exc, path, "empty")


def test_truncated_onnx(onnx_file, tmp_path):
    data = onnx_file.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line_naming(exc, path, "not a valid ONNX")


def test_garbage_onnx(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"this is not a model at all\n" * 10)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line_naming(exc, path, "not a valid ONNX")


def test_corrupt_torch_zip(tiny, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(tiny.state_dict(), good)
    data = good.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line_naming(exc, path, "corrupt")


def test_garbage_torch_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x00\x01 definitely not a pickle")
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line_naming(exc, path, "corrupt")


def test_unknown_extension(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"HDF")
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line_naming(exc, path, "unknown model format '.h5'", ".onnx")


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ("1,28,28", (1, 28, 28)),
        ("1x28x28", (1, 28, 28)),
        (" 3 , 32,32 ", (3, 32, 32)),
        ("(1, 28, 28)", (1, 28, 28)),
        ("784", (784,)),
    ],
)
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "a,b", "1,,28", "1,-2,3", "0x28x28", "1.5,2"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(OptionError, match="--input-shape"):
        parse_input_shape(text)


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        ([], None),
        (["1,28,28"], (1, 28, 28)),
        ("3x32x32", (3, 32, 32)),
        (["input_ids:128", "attention_mask:128"], {"input_ids": (128,), "attention_mask": (128,)}),
        ([" grey : 1,8,8 ", "colour:3x8x8"], {"grey": (1, 8, 8), "colour": (3, 8, 8)}),
        (["input_1:0:1,4"], {"input_1:0": (1, 4)}),  # TF-style names hold a colon
    ],
)
def test_parse_input_shapes(texts, expected):
    assert parse_input_shapes(texts) == expected


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["input_ids:128;attention_mask:128"], "expected DIMS for a single-input model"),
        (["input_ids=128"], "expected DIMS for a single-input model"),
        ([":128"], "expected DIMS"),
        (["ids:"], "expected DIMS"),
        (["ids:0,4"], "expected DIMS"),
        (["ids:4", "ids:5"], "names input 'ids' twice"),
        (["ids:4", "4"], "a shape without a name is for a single-input model"),
        (["4", "5"], "a shape without a name is for a single-input model"),
    ],
)
def test_parse_input_shapes_rejects(texts, message):
    with pytest.raises(OptionError, match=message):
        parse_input_shapes(texts)


def two_input_model(ids_dims, mask_dims) -> onnx.ModelProto:
    """y = ReduceSum(Cast(ids) * mask): int64 ids and a float mask, shapes as given."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["ids_f", "mask"], ["m"]),
            helper.make_node("ReduceSum", ["m"], ["y"], keepdims=0),
        ],
        "two",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_dims),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, mask_dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_onnx_with_several_inputs_fixes_each_symbolic_dim(tmp_path):
    path = tmp_path / "two.onnx"
    onnx.save(two_input_model(["N", "seq"], ["N", "seq"]), path)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line_naming(exc, path, "shape of input 'ids'", "dimension 1 is symbolic",
                           "--input-shape ids:DIMS")
    loaded = load_model(path, input_shape={"ids": (5,), "mask": (5,)})
    assert [(s.name, s.dtype, s.shape) for s in loaded.inputs] == [
        ("ids", np.dtype(np.int64), (5,)), ("mask", np.dtype(np.float32), (5,))]
    assert loaded.input_shapes == {"ids": (5,), "mask": (5,)}
    assert loaded.input_shape_option == {"ids": (5,), "mask": (5,)}
    assert loaded.input_name == "ids" and loaded.input_shape == (5,)
    for value in loaded.proto.graph.input:  # the batch stays dynamic, seq is fixed
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "N" and dims[1].dim_value == 5
    # one from the option, the other from the data's array of that name
    mixed = load_model(path, input_shape={"ids": (5,)},
                       sample_inputs={"mask": np.ones((2, 5), np.float32)})
    assert mixed.input_shapes == {"ids": (5,), "mask": (5,)}
    ids = np.arange(10).reshape(2, 5)
    sess = session(loaded.proto)
    got = sess.run(None, {"ids": ids, "mask": np.ones((2, 5), np.float32)})[0]
    assert got == pytest.approx(float(ids.sum()))


def test_input_shape_names_must_be_the_model_inputs(tmp_path):
    path = tmp_path / "two.onnx"
    onnx.save(two_input_model(["N", 5], ["N", 5]), path)
    assert load_model(path).input_shapes == {"ids": (5,), "mask": (5,)}
    with pytest.raises(OptionError, match=r"names input 'idz', but .*two\.onnx has inputs: ids, mask"):
        load_model(path, input_shape={"idz": (5,)})
    with pytest.raises(OptionError, match=r"has 2 inputs \(ids, mask\): name each input's shape"):
        load_model(path, input_shape=(5,))
    with pytest.raises(ModelLoadError, match="input 'mask' has per-sample shape 5"):
        load_model(path, input_shape={"mask": (6,)})


class IndexedScale(nn.Module):
    """x * 2 plus the sum of the embedded ids: a float and an int64 input."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x * 2 + self.embed(ids).sum(1)


def test_torch_export_program_with_an_integer_input(tmp_path):
    torch.manual_seed(0)
    module = IndexedScale().eval()
    batch = torch.export.Dim("batch", min=1)
    example = (torch.rand(2, 4), torch.zeros(2, 3, dtype=torch.int64))
    path = tmp_path / "indexed.pt2"
    torch.export.save(torch.export.export(module, example,
                                          dynamic_shapes=({0: batch}, {0: batch})), path)
    loaded = load_model(path)
    assert loaded.source_format == "torch.export"
    assert [(s.name, s.dtype, s.shape) for s in loaded.inputs] == [
        ("x", np.dtype(np.float32), (4,)), ("ids", np.dtype(np.int64), (3,))]
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    ids = np.random.default_rng(1).integers(0, 9, (5, 3))
    with torch.no_grad():
        expected = module(torch.from_numpy(x), torch.from_numpy(ids)).numpy()
    got = session(loaded.proto).run(None, {"x": x, "ids": ids})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------------- save


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_save_replaces_existing_output_wholly(tiny_onnx, tmp_path):
    out = tmp_path / "nested" / "dir" / "model.onnx"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"x" * (tiny_onnx.ByteSize() * 3))  # longer than the new content
    assert save_model(tiny_onnx, out) == out
    assert out.read_bytes() == tiny_onnx.SerializeToString()
    assert leftovers(out.parent) == []
    onnx.checker.check_model(onnx.load(out))


def test_save_creates_folders(tiny_onnx, tmp_path):
    out = tmp_path / "a" / "b" / "model.onnx"
    save_model(tiny_onnx, out)
    assert onnx.load(out).graph.node


def test_save_refuses_to_overwrite_input(onnx_file, tiny_onnx, monkeypatch):
    before = onnx_file.read_bytes()
    monkeypatch.chdir(onnx_file.parent)
    with pytest.raises(OptionError) as exc:
        save_model(tiny_onnx, Path(".") / "sub" / ".." / onnx_file.name, input_path=onnx_file)
    assert "is the input file; choose another -o" in str(exc.value)
    assert onnx_file.read_bytes() == before


def test_failed_save_leaves_old_output_and_no_temp(tiny_onnx, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("compressor.io.os.replace", refuse)
    with pytest.raises(OptionError, match="cannot write output"):
        save_model(tiny_onnx, out)
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_large_models_are_saved_with_external_data(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr("compressor.io.EXTERNAL_DATA_THRESHOLD", 1000)  # "large" = over 1 kB
    out = tmp_path / "big.onnx"
    original = tiny_onnx.SerializeToString()
    save_model(tiny_onnx, out)
    assert tiny_onnx.SerializeToString() == original  # the caller's proto is untouched
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    assert out.stat().st_size < len(original)
    assert leftovers(tmp_path) == []
    loaded = load_model(out)  # checked by path, as protos over 2 GB must be
    x = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)
    np.testing.assert_array_equal(run_onnx(loaded.proto, x), run_onnx(tiny_onnx, x))
