"""compressor.data: .npz files, IDX files, image folders, named data sets and their errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from compressor import data
from compressor.data import batches, load_data, read_idx
from compressor.errors import DataError


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
