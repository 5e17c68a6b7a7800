"""compressor.data: .npz files, IDX files, image folders, named data sets and their errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import data
from compressor.data import (
    InputSpec,
    batches,
    graph_input_specs,
    index_bounds,
    load_data,
    model_feeds,
    read_idx,
    stand_in_feeds,
)
from compressor.errors import DataError, UnsupportedModelError


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def write_idx(path, array: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    """A tiny Fashion-MNIST folder: 5 training and 3 test images of 28x28."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 5), ("test", 3)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8)
        image_file, label_file = data.FASHION_MNIST_FILES[split]
        write_idx(tmp_path / image_file, images)
        write_idx(tmp_path / label_file, labels)
        arrays[split] = (images, labels)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    return tmp_path, arrays


# .npz files


def test_npz_uint8_is_scaled_to_unit_range(tmp_path):
    x = np.array([[0, 255], [51, 102]], np.uint8)
    dataset = load_data(write_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1])))
    assert dataset.x.dtype == np.float32
    np.testing.assert_allclose(dataset.x, [[0, 1], [0.2, 0.4]], rtol=1e-6)
    assert dataset.y.dtype == np.int64 and dataset.y.tolist() == [0, 1]
    assert dataset.name == "d.npz"


def test_npz_float_is_kept_and_y_is_optional(tmp_path):
    x = np.random.default_rng(0).random((4, 1, 28, 28))
    dataset = load_data(write_npz(tmp_path / "d.npz", x=x))
    assert dataset.y is None and dataset.x.dtype == np.float32
    np.testing.assert_allclose(dataset.x, x, rtol=1e-6)


def test_npz_keeps_its_arrays_by_name_and_needs_one_besides_y(tmp_path):
    images = np.arange(8, dtype=np.uint8).reshape(2, 4)
    dataset = load_data(write_npz(tmp_path / "d.npz", images=images))
    assert list(dataset.inputs) == ["images"]
    np.testing.assert_array_equal(dataset.inputs["images"], images)  # as stored
    np.testing.assert_allclose(dataset.x, images / 255, rtol=1e-6)  # x: the first, converted
    path = write_npz(tmp_path / "labels.npz", y=np.arange(2))
    with pytest.raises(DataError, match=r"labels\.npz: no input arrays in the file \(keys: y\)"):
        load_data(path)


def test_npz_length_mismatch(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((3, 4), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="x has 3 samples but y has 2 labels"):
        load_data(path)


def test_npz_bad_labels_and_dtypes(tmp_path):
    x = np.zeros((2, 4), np.uint8)
    with pytest.raises(DataError, match="label -1 is out of range"):
        load_data(write_npz(tmp_path / "a.npz", x=x, y=np.array([0, -1])))
    with pytest.raises(
        DataError, match=r"label 10 is out of range for 10 classes \(expected 0..9\)"
    ):
        load_data(write_npz(tmp_path / "b.npz", x=x, y=np.array([0, 10])), num_classes=10)
    with pytest.raises(DataError, match=r"y must be 1-D class indices, got shape \(2, 2\)"):
        load_data(write_npz(tmp_path / "c.npz", x=x, y=np.eye(2, dtype=np.int64)))
    with pytest.raises(DataError, match="x has dtype <U1; expected uint8"):
        load_data(write_npz(tmp_path / "d.npz", x=np.array([["a"], ["b"]])))
    # other integers are kept as they are: token ids and masks are fed to integer inputs
    ints = load_data(write_npz(tmp_path / "i.npz", x=x.astype(np.int32) + 7))
    assert ints.x.dtype == np.int32 and int(ints.x.max()) == 7
    with pytest.raises(DataError, match="NaN or infinite"):
        load_data(write_npz(tmp_path / "e.npz", x=np.array([[np.nan]])))


def test_npz_corrupt_and_truncated(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match=r"garbage\.npz: not a readable \.npz file"):
        load_data(garbage)
    good = write_npz(tmp_path / "good.npz", x=np.arange(4000, dtype=np.uint8).reshape(40, 100))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"truncated\.npz: not a readable \.npz file"):
        load_data(truncated)


def test_empty_data_and_bad_limit(tmp_path):
    path = write_npz(tmp_path / "empty.npz", x=np.zeros((0, 4), np.uint8))
    with pytest.raises(DataError, match=r"empty\.npz: the data set is empty"):
        load_data(path)
    with pytest.raises(DataError, match="limit must be a positive number"):
        load_data(path, limit=0)


def test_missing_file_unknown_name_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match=r"nope\.npz: no such file or folder"):
        load_data(tmp_path / "nope.npz")
    with pytest.raises(DataError, match="unknown data set 'mnist3d'.*fashion-mnist, digits"):
        load_data("mnist3d")
    text = tmp_path / "data.csv"
    text.write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported data file type '\.csv'"):
        load_data(text)


# Shapes and limits


def test_limit_and_reshape_rules(tmp_path):
    x = np.arange(5 * 784, dtype=np.float32).reshape(5, 784) / (5 * 784)
    path = write_npz(tmp_path / "flat.npz", x=x, y=np.arange(5))
    dataset = load_data(path, limit=3, input_shape=(1, 28, 28))
    assert dataset.x.shape == (3, 1, 28, 28) and dataset.y.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(dataset.x.reshape(3, 784), x[:3])
    assert load_data(
        write_npz(tmp_path / "hw.npz", x=x.reshape(5, 28, 28)), input_shape=(1, 28, 28)
    ).x.shape == (5, 1, 28, 28)
    assert load_data(path, input_shape=(784,)).x.shape == (5, 784)
    with pytest.raises(
        DataError,
        match=r"flat\.npz: samples have shape \(784,\), which does not "
        r"fit the model input shape \(1, 32, 32\)",
    ):
        load_data(path, input_shape=(1, 32, 32))


def test_channels_last_images_are_transposed(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    dataset = load_data(write_npz(tmp_path / "hwc.npz", x=x), input_shape=(3, 4, 5))
    np.testing.assert_allclose(dataset.x, x.transpose(0, 3, 1, 2) / 255, rtol=1e-6)


def test_batches():
    x = np.arange(10)
    assert [b.tolist() for b in batches(x, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(DataError, match="batch size must be positive"):
        next(batches(x, 0))


# IDX files and the named data sets


def test_fashion_mnist_from_idx_files(fake_fashion_mnist):
    _, arrays = fake_fashion_mnist
    train = load_data("fashion-mnist", split="train")
    assert train.x.shape == (5, 1, 28, 28) and train.name == "fashion-mnist:train"
    np.testing.assert_allclose(train.x[:, 0] * 255, arrays["train"][0], atol=1e-3)
    assert train.y.dtype == np.int64 and train.y.tolist() == [0, 1, 2, 3, 4]
    test = load_data("fashion-mnist", limit=2, input_shape=(784,))
    assert test.x.shape == (2, 784) and test.y.tolist() == [0, 1]
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_data("fashion-mnist", split="valid")


def test_fashion_mnist_missing_directory_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "absent"))
    with pytest.raises(
        DataError,
        match=r"t10k-images-idx3-ubyte\.gz not found; install it with "
        r"`apt-get install dataset-fashion-mnist`.*\.npz",
    ):
        load_data("fashion-mnist")


def test_idx_corrupt_truncated_and_mismatched(fake_fashion_mnist):
    folder, _ = fake_fashion_mnist
    images = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    with gzip.open(images, "wb") as f:  # valid gzip, IDX payload cut short
        f.write(raw[:-10])
    with pytest.raises(
        DataError,
        match=r"t10k-images-idx3-ubyte\.gz: IDX data holds 2342 bytes "
        r"but its header \(3, 28, 28\) needs 2352",
    ):
        load_data("fashion-mnist")
    images.write_bytes(gzip.compress(raw)[:40])  # the gzip stream itself cut short
    with pytest.raises(DataError, match="cannot decompress"):
        read_idx(images)
    images.write_bytes(b"garbage, not gzip")
    with pytest.raises(DataError, match="cannot decompress"):
        read_idx(images)
    with gzip.open(images, "wb") as f:
        f.write(b"\x12\x34\x08\x03")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(images)
    write_idx(images, np.zeros((4, 28, 28), np.uint8))  # 4 images, 3 labels
    with pytest.raises(DataError, match="has 4 images but t10k-labels-idx1-ubyte.gz has 3 labels"):
        load_data("fashion-mnist")


def test_digits():
    dataset = load_data("digits", limit=10)
    assert dataset.x.shape == (10, 1, 8, 8) and dataset.x.dtype == np.float32
    assert 0 <= dataset.x.min() and dataset.x.max() <= 1
    assert dataset.y.tolist() == list(range(10))


@pytest.mark.skipif(
    not (data.fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST (dataset-fashion-mnist) is not installed",
)
def test_bundled_eval_subset_is_the_start_of_the_test_split():
    from compressor.models.zoo import DATA_DIR

    test = load_data("fashion-mnist", limit=2000)
    bundled = load_data(DATA_DIR / "fashion_mnist_eval.npz")
    np.testing.assert_array_equal(bundled.x, test.x)
    np.testing.assert_array_equal(bundled.y, test.y)


# Image folders


def test_image_folder_with_class_subfolders(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for label, cls in enumerate(["cat", "bird"]):  # labels follow sorted names: bird 0, cat 1
        (tmp_path / cls).mkdir()
        for i in range(2 + label):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            image_module.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    gray = load_data(tmp_path, input_shape=(1, 28, 28))
    assert gray.x.shape == (5, 1, 28, 28) and gray.x.dtype == np.float32
    assert gray.classes == ("bird", "cat") and gray.y.tolist() == [0, 0, 0, 1, 1]
    assert 0 <= gray.x.min() and gray.x.max() <= 1
    rgb = load_data(tmp_path, input_shape=(3, 10, 12))  # no resize: the pixels come back exact
    expected = np.asarray(image_module.open(tmp_path / "bird" / "0.png")).transpose(2, 0, 1)
    np.testing.assert_allclose(rgb.x[0] * 255, expected, atol=1e-3)


def test_image_folder_flat_and_errors(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    image_module.new("L", (8, 8), 255).save(tmp_path / "a.png")
    image_module.new("L", (8, 8), 0).save(tmp_path / "b.jpg")
    flat = load_data(tmp_path)
    assert flat.y is None and flat.x.shape == (2, 1, 8, 8) and flat.x[0].min() == 1.0
    image_module.new("L", (9, 8)).save(tmp_path / "c.png")
    with pytest.raises(DataError, match=r"c\.png: image is 9x8 but the first image is 8x8"):
        load_data(tmp_path)
    (tmp_path / "d.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"d\.png: cannot read image"):
        load_data(tmp_path, input_shape=(1, 8, 8))
    with pytest.raises(DataError, match=r"1 or 3 channels, got \(2, 8, 8\)"):
        load_data(tmp_path, input_shape=(2, 8, 8))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: no images found"):
        load_data(empty)


# Matching arrays to a model's inputs

IDS = InputSpec("input_ids", np.dtype(np.int64), (6,))
MASK = InputSpec("attention_mask", np.dtype(np.bool_), (6,))
PIXELS = InputSpec("image", np.dtype(np.float32), (1, 2, 2))


def test_npz_arrays_are_matched_to_inputs_by_name_and_keep_integer_types(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30_000, (5, 6), dtype=np.int32)
    mask = rng.integers(0, 2, (5, 6)).astype(np.int64)
    path = write_npz(tmp_path / "calib.npz", attention_mask=mask, input_ids=ids,
                     token_type_ids=np.zeros((5, 6), np.int64), y=np.arange(5))
    dataset = load_data(path, limit=4)
    assert {k: len(v) for k, v in dataset.inputs.items()} == {
        "attention_mask": 4, "input_ids": 4, "token_type_ids": 4}
    feeds, notes = model_feeds(dataset, [IDS, MASK])
    assert list(feeds) == ["input_ids", "attention_mask"] and notes == []  # extras ignored
    assert feeds["input_ids"].dtype == np.int64  # int32 ids as the model's int64, unscaled
    np.testing.assert_array_equal(feeds["input_ids"], ids[:4])
    assert feeds["attention_mask"].dtype == np.bool_
    np.testing.assert_array_equal(feeds["attention_mask"], mask[:4].astype(bool))


def test_pixels_and_integers_for_a_float_input(tmp_path):
    pixels = np.array([[[[0, 51], [102, 255]]]], np.uint8)
    feeds, notes = model_feeds(load_data(write_npz(tmp_path / "u8.npz", image=pixels)), [PIXELS])
    np.testing.assert_allclose(feeds["image"], pixels / 255, rtol=1e-6)  # scaled, silently
    assert notes == []
    ints = load_data(write_npz(tmp_path / "i16.npz", x=pixels.astype(np.int16)))
    feeds, notes = model_feeds(ints, [PIXELS])
    assert feeds["image"].dtype == np.float32
    np.testing.assert_array_equal(feeds["image"], pixels)  # as they are: not scaled
    assert notes == [
        "i16.npz: array 'x' is int16 (values 0..255) but model input 'image' is float32: fed as "
        "float32 without scaling (0-255 pixels fed to a model trained on [0, 1] calibrate it "
        "wrongly: save floats, or uint8 pixels to have them scaled by 1/255)"
    ]


def test_a_single_input_takes_x_or_the_only_array_and_is_reshaped(tmp_path):
    flat = np.arange(12, dtype=np.float32).reshape(3, 4) / 12
    for key in ("x", "pixels"):
        dataset = load_data(write_npz(tmp_path / f"{key}.npz", **{key: flat}))
        feeds, _ = model_feeds(dataset, [PIXELS])
        assert feeds["image"].shape == (3, 1, 2, 2)
        np.testing.assert_array_equal(feeds["image"].reshape(3, 4), flat)
    images = load_data("digits", limit=2)  # no arrays by name: x is the input's
    feeds, _ = model_feeds(images, [InputSpec("input", np.dtype(np.float32), (64,))])
    np.testing.assert_array_equal(feeds["input"], images.x.reshape(2, 64))


def test_mismatches_name_the_input_the_file_and_what_the_model_expects(tmp_path):
    ids = np.zeros((4, 6), np.int64)
    two = load_data(write_npz(tmp_path / "calib.npz", x=ids, y=np.zeros(4, np.int64)))
    with pytest.raises(DataError) as exc:
        model_feeds(two, [IDS, MASK])
    assert str(exc.value) == "calib.npz has no array for model input 'input_ids' (arrays: x, y)"

    def match(spec, **arrays):
        model_feeds(load_data(write_npz(tmp_path / "calib.npz", **arrays)), spec)

    with pytest.raises(DataError) as exc:
        match([IDS, MASK], input_ids=ids, attention_mask=np.ones((4, 8), np.int64))
    assert str(exc.value) == (
        "calib.npz: input 'attention_mask' has shape (4, 8) but the model expects (N, 6) bool"
    )
    with pytest.raises(DataError) as exc:
        match([IDS, MASK], input_ids=ids + 0.5, attention_mask=np.ones((4, 6), bool))
    assert str(exc.value) == (
        "calib.npz: input 'input_ids' has dtype float64 but the model expects (N, 6) int64"
    )
    with pytest.raises(DataError, match=r"input 'attention_mask' has dtype int64 but the model "
                                        r"expects \(N, 6\) bool"):
        match([IDS, MASK], input_ids=ids, attention_mask=np.full((4, 6), 2))
    small = InputSpec("input_ids", np.dtype(np.int32), (6,))
    with pytest.raises(DataError, match=r"input 'input_ids' has values 0\.\.3000000009, outside "
                                        r"the range of the model's int32"):
        match([small], input_ids=np.arange(24).reshape(4, 6) * 130_434_783)
    with pytest.raises(DataError, match="samples of shape \\(5,\\) do not fit \\(1, 2, 2\\)"):
        match([PIXELS], x=np.zeros((4, 5), np.float32))
    with pytest.raises(DataError, match=r"calib\.npz: the arrays have different numbers of "
                                        r"samples \(input_ids 4, attention_mask 3\)"):
        match([IDS, MASK], input_ids=ids, attention_mask=np.ones((3, 6), bool))


def test_symbolic_dimensions_take_the_data_size():
    dynamic = InputSpec("input_ids", np.dtype(np.int64), (None,))
    assert dynamic.describe() == "(N, ?) int64" and not dynamic.is_static
    assert dynamic.accepts((9,)) and not dynamic.accepts((9, 2))
    stand_in = data.Dataset(np.zeros((2, 9), np.int64), None, "d", inputs={
        "input_ids": np.zeros((2, 9), np.int64)})
    assert model_feeds(stand_in, [dynamic]).arrays["input_ids"].shape == (2, 9)
    with pytest.raises(DataError, match="pass --input-shape input_ids:DIMS"):
        stand_in_feeds([dynamic], 4)


def token_model() -> onnx.ModelProto:
    """ids -> Cast -> Gather of a 7-row table; positions -> Gather of a Constant 5-row table;
    segment ids index nothing (they scale the sum, as does a float mask)."""
    table = numpy_helper.from_array(np.ones((7, 3), np.float32), "table")
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "ids64"], ["emb"]),
        helper.make_node("Constant", [], ["positions_table"],
                         value=numpy_helper.from_array(np.ones((5, 3), np.float32))),
        helper.make_node("Gather", ["positions_table", "positions"], ["pos"]),
        helper.make_node("Add", ["emb", "pos"], ["h"]),
        helper.make_node("Cast", ["segments"], ["seg"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["seg", "axes"], ["seg3"]),
        helper.make_node("Mul", ["h", "seg3"], ["hs"]),
        helper.make_node("Unsqueeze", ["mask", "axes"], ["mask3"]),
        helper.make_node("Mul", ["hs", "mask3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, ["N", 4]),
         helper.make_tensor_value_info("positions", TensorProto.INT64, ["N", 4]),
         helper.make_tensor_value_info("segments", TensorProto.INT64, ["N", 4]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3])],
        [table, numpy_helper.from_array(np.array([-1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def test_stand_ins_index_within_the_table_and_masks_are_ones():
    model = token_model()
    assert index_bounds(model) == {"ids": 7, "positions": 5}
    specs = graph_input_specs(model)
    assert [(s.name, s.dtype.name, s.shape, s.is_mask) for s in specs] == [
        ("ids", "int32", (4,), False), ("positions", "int64", (4,), False),
        ("segments", "int64", (4,), False), ("mask", "float32", (4,), True)]
    feeds, notes = stand_in_feeds(specs, 200, model=model, seed=3)
    assert feeds["ids"].dtype == np.int32 and feeds["ids"].min() >= 0
    assert feeds["ids"].max() == 6 and feeds["positions"].max() == 4  # the whole table is used
    assert feeds["segments"].max() == 99  # indexes nothing: 0..99
    np.testing.assert_array_equal(feeds["mask"], np.ones((200, 4), np.float32))
    assert notes == ["random stand-in inputs: ids 0..6 (the rows of the table it indexes); "
                     "positions 0..4 (the rows of the table it indexes); segments 0..99 (it "
                     "indexes no constant table); mask all ones"]
    from compressor import runtime

    runtime.session(model).run(None, feeds)  # onnxruntime refuses out-of-range Gather indices
    floats = stand_in_feeds([PIXELS], 3, seed=0)
    np.testing.assert_array_equal(
        floats.arrays["image"],
        np.random.default_rng(0).standard_normal((3, 1, 2, 2), dtype=np.float32))
    assert floats.notes == []


def test_graph_inputs_of_unsupported_types_are_refused():
    model = token_model()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.STRING
    with pytest.raises(UnsupportedModelError, match="input 'ids'.*cannot feed"):
        graph_input_specs(model)
