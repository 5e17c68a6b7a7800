"""Calibration and evaluation data: ``.npz`` files, image folders and two named data sets,
and how they become the feeds of a model's inputs.

``load_data(spec)`` accepts
- a ``.npz`` file with an array ``x`` (uint8 pixels are scaled by 1/255, floats are kept) and
  optionally integer labels ``y``; or, for a model with several inputs, one array per model
  input, named as the input (``input_ids``, ``attention_mask``, ...), and optionally ``y``;
- a folder of images (PNG, JPEG, BMP); when it has subfolders, each subfolder is a class and the
  labels number the subfolders in sorted order;
- ``fashion-mnist``: the gzip IDX files of the Debian package ``dataset-fashion-mnist``, read
  from ``/usr/share/datasets/fashion-mnist`` or ``$COMPRESSOR_FASHION_MNIST_DIR``;
- ``digits``: scikit-learn's 8x8 digits, shape ``(N, 1, 8, 8)``.

``model_feeds(dataset, inputs)`` matches the arrays to the model's inputs (``InputSpec``s):
integer and bool arrays are fed as the input's type, never scaled; uint8 pixels for a float
input are scaled by 1/255; other integer data for a float input is fed unscaled, with a note.
``stand_in_feeds`` makes random inputs of the right types when there is no data.

Every problem raises ``DataError`` with a message naming the file, key or data set at fault.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from compressor.errors import DataError, UnsupportedModelError

if TYPE_CHECKING:
    import onnx
    from onnxruntime import InferenceSession

Shape = tuple[int, ...]

FASHION_MNIST_ENV = "COMPRESSOR_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NAMED_DATASETS = ("fashion-mnist", "digits")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/ format).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class Dataset:
    """Samples ``x`` (``N x per-sample shape``; float32 images in [0, 1]) and optional labels.

    A ``.npz`` file also keeps its arrays by name, as stored, in ``inputs``: that is what
    ``model_feeds`` matches to the model's inputs (a file with several arrays names them as
    the model's inputs). ``x`` is then the file's first array, converted like ``x``.
    """

    x: np.ndarray
    y: np.ndarray | None
    name: str
    classes: tuple[str, ...] | None = None  # class names of an image folder, by label
    inputs: Mapping[str, np.ndarray] | None = None  # a .npz file's arrays but y, as stored

    def __len__(self) -> int:
        return len(self.x)

    @property
    def sample_shape(self) -> Shape:
        return tuple(self.x.shape[1:])


def load_data(
    spec: str | os.PathLike,
    *,
    split: str = "test",
    limit: int | None = None,
    input_shape: Shape | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """Load the data set ``spec`` (see the module docstring for what it may be).

    ``split`` picks train or test of a named data set; ``limit`` keeps the first samples;
    ``input_shape`` (per sample, no batch) reshapes ``x`` when the sizes agree, and sets the
    channels and size of images; ``num_classes`` bounds the labels.
    """
    if limit is not None and limit < 1:
        raise DataError(f"{spec}: limit must be a positive number of samples, got {limit}")
    path = Path(spec)
    if path.is_dir():
        dataset = _load_image_folder(path, input_shape)
    elif path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(
                f"{path}: unsupported data file type '{path.suffix}'; "
                "expected a .npz file, an image folder or one of: " + ", ".join(NAMED_DATASETS)
            )
        dataset = _load_npz(path)
    elif str(spec) in NAMED_DATASETS:
        dataset = _load_named(str(spec), split)
    elif path.suffix or os.sep in str(spec) or "/" in str(spec):
        raise DataError(f"{spec}: no such file or folder")
    else:
        raise DataError(
            f"unknown data set '{spec}': expected a .npz file, an image folder or one of: "
            + ", ".join(NAMED_DATASETS)
        )

    x, y, inputs = dataset.x, dataset.y, dataset.inputs
    if limit is not None:
        x = x[:limit]
        y = None if y is None else y[:limit]
        inputs = None if inputs is None else {k: v[:limit] for k, v in inputs.items()}
    if len(x) == 0:
        raise DataError(f"{dataset.name}: the data set is empty")
    if input_shape is not None and (inputs is None or len(inputs) == 1):
        # one model input: x is its samples (a file of several arrays is matched by name)
        x = _fit_shape(x, tuple(input_shape), dataset.name)
    if y is not None and num_classes is not None and len(y) and int(y.max()) >= num_classes:
        raise DataError(
            f"{dataset.name}: label {int(y.max())} is out of range for {num_classes} classes "
            f"(expected 0..{num_classes - 1})"
        )
    return Dataset(np.ascontiguousarray(x), y, dataset.name, dataset.classes, inputs)


def batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of ``x`` of ``batch_size`` samples (the last one may be shorter)."""
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


def _fit_shape(x: np.ndarray, input_shape: Shape, name: str) -> np.ndarray:
    sample_shape = tuple(x.shape[1:])
    if sample_shape == input_shape:
        return x
    if math.prod(sample_shape) != math.prod(input_shape):
        raise DataError(
            f"{name}: samples have shape {sample_shape}, which does not fit the model input "
            f"shape {input_shape} ({math.prod(sample_shape)} vs {math.prod(input_shape)} values)"
        )
    channels_last = len(input_shape) == 3 and sample_shape == (
        input_shape[1],
        input_shape[2],
        input_shape[0],
    )
    if channels_last:  # N,H,W,C images -> N,C,H,W; a plain reshape would scramble the pixels
        return x.transpose(0, 3, 1, 2)
    return x.reshape((len(x), *input_shape))


def _check_numbers(array: np.ndarray, where: str, key: str) -> None:
    """Numbers only (no strings, objects, complex values), and finite floats."""
    if array.dtype != np.bool_ and not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise DataError(
            f"{where}: {key} has dtype {array.dtype}; expected uint8 pixels (0-255), floats, "
            "or integers (token ids, masks)"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DataError(f"{where}: {key} contains NaN or infinite values")


def _as_images(x: np.ndarray, where: str, key: str = "x") -> np.ndarray:
    """uint8 -> float32 / 255; floats -> float32; other integers and bools as they are (fed
    to integer inputs as such; ``model_feeds`` notes it when they go to a float input)."""
    _check_numbers(x, where, key)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False)
    return x


def _as_labels(y: np.ndarray, count: int, where: str, key: str = "x") -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{where}: y must be 1-D class indices, got shape {y.shape}")
    if len(y) != count:
        raise DataError(f"{where}: {key} has {count} samples but y has {len(y)} labels")
    if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: y has dtype {y.dtype}; expected integer class indices")
    y = y.astype(np.int64)
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{where}: label {int(y.min())} is out of range (labels must be >= 0)")
    return y


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            arrays = {key: archive[key] for key in keys if key != "y"}
            y = archive["y"] if "y" in keys else None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a readable .npz file (corrupt or truncated): {exc}") from exc
    if not arrays:
        raise DataError(
            f"{path}: no input arrays in the file (keys: {', '.join(keys) or 'none'}); expected "
            "x, or one array per model input named as the input"
        )
    for key, array in arrays.items():
        if array.ndim < 1:
            raise DataError(f"{path}: {key} is a scalar; expected an array of samples")
        _check_numbers(array, str(path), key)
    counts = {key: len(array) for key, array in arrays.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{key} {n}" for key, n in counts.items())
        raise DataError(f"{path}: the arrays have different numbers of samples ({listed})")
    first = "x" if "x" in arrays else next(iter(arrays))
    x = _as_images(arrays[first], str(path), first)
    if y is not None:
        y = _as_labels(y, len(x), str(path), first)
    return Dataset(x, y, path.name, None, arrays)


def _load_named(name: str, split: str) -> Dataset:
    if name == "digits":
        return _load_digits()
    if split not in FASHION_MNIST_FILES:
        raise DataError(
            f"fashion-mnist: unknown split '{split}'; expected one of: "
            + ", ".join(FASHION_MNIST_FILES)
        )
    images, labels = load_fashion_mnist_raw(split)
    x = images[:, None].astype(np.float32) / np.float32(255.0)
    return Dataset(x, labels.astype(np.int64), f"fashion-mnist:{split}")


def _load_digits() -> Dataset:
    """scikit-learn's digits (1797 samples, no split): 8x8 pixels 0-16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None]
    return Dataset(x, digits.target.astype(np.int64), "digits")


def fashion_mnist_dir() -> Path:
    """Where the Fashion-MNIST IDX files are looked for."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR)


def load_fashion_mnist_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as uint8 images ``(N, 28, 28)`` and uint8 labels ``(N,)``."""
    directory = fashion_mnist_dir()
    image_file, label_file = FASHION_MNIST_FILES[split]
    paths = [directory / image_file, directory / label_file]
    for path in paths:
        if not path.is_file():
            raise DataError(
                f"Fashion-MNIST file {path} not found; install it with "
                f"`apt-get install dataset-fashion-mnist`, point {FASHION_MNIST_ENV} at a folder "
                "with the IDX files, or pass an .npz file instead"
            )
    images, labels = (read_idx(path) for path in paths)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"{paths[0]}: expected images (N, H, W) and labels (N,), got {images.shape} and "
            f"{labels.shape} in {paths[1].name}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{directory}: {image_file} has {len(images)} images but {label_file} has "
            f"{len(labels)} labels"
        )
    return images, labels


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed when its name ends in ``.gz``)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot decompress (corrupt or truncated gzip): {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX data holds {len(raw) - header} bytes but its header {shape} needs "
            f"{expected} (truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _load_image_folder(folder: Path, input_shape: Shape | None) -> Dataset:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(
            f"{folder}: reading an image folder needs Pillow (`pip install pillow`)"
        ) from None

    def images_in(directory: Path) -> list[Path]:
        return sorted(
            p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )

    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        files: list[tuple[Path, int]] = [
            (path, label) for label, d in enumerate(class_dirs) for path in images_in(d)
        ]
        classes: tuple[str, ...] | None = tuple(d.name for d in class_dirs)
    else:
        files = [(path, -1) for path in images_in(folder)]
        classes = None
    if not files:
        raise DataError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files)")

    if input_shape is not None and (len(input_shape) != 3 or input_shape[0] not in (1, 3)):
        raise DataError(
            f"{folder}: images need a model input shape (C, H, W) with 1 or 3 channels, "
            f"got {tuple(input_shape)}"
        )
    samples = []
    target: Shape | None = tuple(input_shape) if input_shape is not None else None
    for path, _ in files:
        try:
            with Image.open(path) as image:
                if target is None:  # no model shape given: the first image sets it
                    channels = 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
                    target = (channels, image.height, image.width)
                mode = "L" if target[0] == 1 else "RGB"
                converted = image.convert(mode)
                if converted.size != (target[2], target[1]):
                    if input_shape is None:
                        raise DataError(
                            f"{path}: image is {converted.width}x{converted.height} but the "
                            f"first image is {target[2]}x{target[1]}; pass the model's input "
                            "shape so images are resized"
                        )
                    converted = converted.resize((target[2], target[1]), Image.BILINEAR)
                pixels = np.asarray(converted, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: cannot read image: {exc}") from exc
        samples.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    x = np.stack(samples).astype(np.float32) / np.float32(255.0)
    y = np.array([label for _, label in files], np.int64) if classes is not None else None
    return Dataset(x, y, folder.name, classes)


# ----------------------------------------------------------------------------- model inputs

# onnxruntime's type strings of the inputs compressor can feed.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}
DEFAULT_INDEX_BOUND = 100  # random integer inputs that index no table take 0..99
# Ops that pass an input's values through unchanged (the ids of an embedding are often cast
# or reshaped before the Gather that reads the table).
_PASS_THROUGH_OPS = frozenset({"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, element type and per-sample shape (without the batch).

    ``shape`` holds None where the model leaves a dimension symbolic (a dynamic sequence
    length, say), and is None itself when the model does not record the input's rank;
    ``fixed_batch`` is set when the model's batch dimension is a number.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None
    fixed_batch: int | None = None

    @property
    def is_static(self) -> bool:
        """Whether every per-sample dimension is known."""
        return self.shape is not None and all(d is not None for d in self.shape)

    @property
    def is_mask(self) -> bool:
        """A bool input, or one named like a mask (``attention_mask``): random stand-ins of
        it are all ones (attend everywhere), never random bits."""
        return self.dtype == np.bool_ or "mask" in self.name.lower()

    def accepts(self, sample_shape: Sequence[int]) -> bool:
        """Whether samples of ``sample_shape`` fit this input (symbolic dimensions take any
        size)."""
        if self.shape is None:
            return True
        return len(sample_shape) == len(self.shape) and all(
            want is None or have == want
            for have, want in zip(sample_shape, self.shape, strict=True)
        )

    def with_shape(self, shape: Shape) -> InputSpec:
        return replace(self, shape=tuple(int(d) for d in shape))

    def describe(self) -> str:
        """The shape with the batch and the type, as a user reads it: ``(N, 128) int64``."""
        batch = "N" if self.fixed_batch is None else str(self.fixed_batch)
        dims = ["..."] if self.shape is None else ["?" if d is None else str(d) for d in self.shape]
        return f"({', '.join([batch, *dims])}) {np.dtype(self.dtype).name}"


def _spec(name: str, dtype: Any, dims: Sequence[Any] | None) -> InputSpec:
    if dims is not None and len(dims) == 0:
        raise UnsupportedModelError(f"input '{name}' is a scalar; expected a batch of samples")
    if dims is None:
        return InputSpec(name, np.dtype(dtype), None)
    known = [d if isinstance(d, int) and d > 0 else None for d in dims]
    return InputSpec(name, np.dtype(dtype), tuple(known[1:]), known[0])


def graph_input_specs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The inputs of an ONNX graph (initializers listed as inputs are not inputs)."""
    import onnx

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, ValueError, TypeError):
            dtype = None
        if dtype is None or dtype.kind not in "biuf":
            kind = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
            raise UnsupportedModelError(
                f"input '{value.name}' holds {kind} elements, which compressor cannot feed "
                "(float, integer and bool tensors only)"
            )
        dims = None
        if tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        specs.append(_spec(value.name, dtype, dims))
    return tuple(specs)


def session_input_specs(session: InferenceSession) -> tuple[InputSpec, ...]:
    """The inputs of an onnxruntime session."""
    specs = []
    for value in session.get_inputs():
        if value.type not in _ORT_TYPES:
            raise UnsupportedModelError(
                f"input '{value.name}' is {value.type}; compressor feeds float, integer and "
                "bool tensors"
            )
        specs.append(_spec(value.name, _ORT_TYPES[value.type], list(value.shape)))
    return tuple(specs)


class Feeds(NamedTuple):
    """Arrays by model input name, all with the same number of samples, and notes on how the
    data was converted (for the user to read)."""

    arrays: dict[str, np.ndarray]
    notes: list[str]


def model_feeds(data: Any, inputs: Sequence[InputSpec], *, source: str | None = None) -> Feeds:
    """Match ``data`` (a ``Dataset``, or anything with ``x``, ``y`` and ``name``) to the model's
    ``inputs``.

    Arrays are found by input name; a single-input model also takes ``x``, or the data's
    only array. Each is converted to its input's type: integers and bools are fed as the
    input's integer or bool type, never scaled; uint8 pixels for a float input are scaled by
    1/255; other integers for a float input are fed unscaled, and a note says so. A single
    input's samples are reshaped to the model's per-sample shape when the sizes agree (flat
    vectors, channels-last images); several inputs must match exactly. ``source`` names
    the data in messages (default: its name).
    """
    where = source or getattr(data, "name", "data")
    named: Mapping[str, np.ndarray] | None = getattr(data, "inputs", None) or None
    y = getattr(data, "y", None)
    available = list(named) if named is not None else ["x"]
    listed = ", ".join(available + (["y"] if y is not None else []))
    single = len(inputs) == 1
    arrays: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for spec in inputs:
        if named is not None and spec.name in named:
            key, array = spec.name, named[spec.name]
        elif single and ("x" in available or len(available) == 1):
            # a single input takes x, or the data's only array whatever its name
            key = "x" if "x" in available else available[0]
            array = named[key] if named is not None else data.x
        else:
            raise DataError(
                f"{where} has no array for model input '{spec.name}' (arrays: {listed})"
            )
        array = np.asarray(array)
        if array.ndim == 0:
            raise DataError(f"{where}: {key} is a scalar; expected an array of samples")
        array, note = _convert(array, spec, where, key)
        if note:
            notes.append(note)
        arrays[spec.name] = np.ascontiguousarray(_fit(array, spec, where, single))
    counts = {name: len(array) for name, array in arrays.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{name} {n}" for name, n in counts.items())
        raise DataError(f"{where}: the inputs have different numbers of samples ({detail})")
    if next(iter(counts.values()), 0) == 0:
        raise DataError(f"{where}: the data set is empty")
    return Feeds(arrays, notes)


def _value_range(array: np.ndarray) -> str:
    if array.size == 0:
        return "empty"
    low, high = array.min(), array.max()
    return f"{low.item()}..{high.item()}"


def _convert(
    array: np.ndarray, spec: InputSpec, where: str, key: str
) -> tuple[np.ndarray, str | None]:
    """``array`` as ``spec``'s element type, and a note when the conversion is doubtful."""
    want, have = np.dtype(spec.dtype), array.dtype
    wrong = DataError(
        f"{where}: input '{spec.name}' has dtype {have} but the model expects {spec.describe()}"
    )
    if have != np.bool_ and not (
        np.issubdtype(have, np.integer) or np.issubdtype(have, np.floating)
    ):
        raise wrong
    if want.kind == "f":
        if have == np.uint8:  # pixels: 0-255 -> [0, 1], as the loader does for x
            return (array.astype(np.float32) / np.float32(255.0)).astype(want, copy=False), None
        if have.kind == "f":
            if not np.isfinite(array).all():
                raise DataError(f"{where}: {key} contains NaN or infinite values")
            return array.astype(want, copy=False), None
        note = (
            f"{where}: array '{key}' is {have} (values {_value_range(array)}) but model input "
            f"'{spec.name}' is {want}: fed as {want} without scaling (0-255 pixels fed to a "
            "model trained on [0, 1] calibrate it wrongly: save floats, or uint8 pixels to "
            "have them scaled by 1/255)"
        )
        return array.astype(want), note
    if want.kind in "iu":
        if have.kind == "f":
            raise wrong
        if have.kind != "b" and array.size:
            info = np.iinfo(want)
            if array.min() < info.min or array.max() > info.max:
                raise DataError(
                    f"{where}: input '{spec.name}' has values {_value_range(array)}, outside "
                    f"the range of the model's {want} ({info.min}..{info.max})"
                )
        return array.astype(want, copy=False), None
    if want.kind == "b":
        if have.kind == "b":
            return array, None
        if have.kind in "iu" and np.isin(array, (0, 1)).all():
            return array.astype(np.bool_), None
        raise wrong
    raise UnsupportedModelError(
        f"input '{spec.name}' is {want}; compressor feeds float, integer and bool tensors"
    )


def _fit(array: np.ndarray, spec: InputSpec, where: str, single: bool) -> np.ndarray:
    """``array`` with samples of ``spec``'s shape (reshaped for a single input, see above)."""
    sample = tuple(array.shape[1:])
    if spec.accepts(sample):
        return array
    detail = ""
    if single and spec.is_static:
        target = tuple(int(d) for d in spec.shape)  # type: ignore[union-attr, arg-type]
        if math.prod(sample) == math.prod(target):
            return _fit_shape(array, target, where)
        detail = (
            f"; samples of shape {sample} do not fit {target} "
            f"({math.prod(sample)} vs {math.prod(target)} values)"
        )
    raise DataError(
        f"{where}: input '{spec.name}' has shape {tuple(array.shape)} but the model expects "
        f"{spec.describe()}{detail}"
    )


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Graph inputs that index a constant table (the token ids of an embedding's Gather),
    possibly through casts and reshapes: how many rows they may index, by input name."""
    from onnx import numpy_helper

    tables = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value":
                    tables[node.output[0]] = tuple(numpy_helper.to_array(attribute.t).shape)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    bounds: dict[str, int] = {}
    for spec in graph_input_specs(model):
        frontier, seen = [spec.name], {spec.name}
        while frontier:
            tensor = frontier.pop()
            for node in consumers.get(tensor, []):
                if node.op_type in _PASS_THROUGH_OPS and node.input[0] == tensor:
                    for out in node.output:
                        if out and out not in seen:
                            seen.add(out)
                            frontier.append(out)
                elif (
                    node.op_type == "Gather"
                    and len(node.input) > 1
                    and node.input[1] == tensor
                    and node.input[0] in tables
                ):
                    dims = tables[node.input[0]]
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if dims and -len(dims) <= axis < len(dims):
                        rows = dims[axis]
                        bounds[spec.name] = min(bounds.get(spec.name, rows), rows)
    return bounds


def stand_in_feeds(
    inputs: Sequence[InputSpec],
    count: int,
    *,
    model: onnx.ModelProto | None = None,
    seed: int = 0,
    floats: str = "normal",
) -> Feeds:
    """Random inputs for running a model without data: floats standard normal (``floats=
    "uniform"``: in [0, 1)); masks (bool inputs, inputs named like ``*mask*``) all ones;
    other integer inputs 0..rows-1 of the table they index in ``model`` (an embedding's
    vocabulary), else 0..99. Every per-sample dimension must be known. The notes say what
    the integer inputs hold.
    """
    if floats not in ("normal", "uniform"):
        raise ValueError(f"floats must be 'normal' or 'uniform', not {floats!r}")
    rng = np.random.default_rng(seed)
    bounds = index_bounds(model) if model is not None else {}
    arrays: dict[str, np.ndarray] = {}
    described: list[str] = []
    for spec in inputs:
        if not spec.is_static:
            raise DataError(
                f"input '{spec.name}' has shape {spec.describe()} with unknown dimensions and "
                f"there is no data to take them from: pass --input-shape {spec.name}:DIMS"
            )
        shape = (count, *spec.shape)  # type: ignore[misc]
        dtype = np.dtype(spec.dtype)
        if spec.is_mask:
            arrays[spec.name] = np.ones(shape, dtype)
            described.append(f"{spec.name} all ones")
        elif dtype.kind == "f":
            values = (
                rng.standard_normal(shape, dtype=np.float32)
                if floats == "normal"
                else rng.random(shape, dtype=np.float32)
            )
            arrays[spec.name] = values.astype(dtype, copy=False)
        elif dtype.kind in "iu":
            rows = bounds.get(spec.name)
            high = min(rows or DEFAULT_INDEX_BOUND, int(np.iinfo(dtype).max) + 1)
            arrays[spec.name] = rng.integers(0, high, shape).astype(dtype)
            why = "the rows of the table it indexes" if rows else "it indexes no constant table"
            described.append(f"{spec.name} 0..{high - 1} ({why})")
        else:
            raise UnsupportedModelError(
                f"input '{spec.name}' is {dtype}; compressor feeds float, integer and bool tensors"
            )
    notes = [f"random stand-in inputs: {'; '.join(described)}"] if described else []
    return Feeds(arrays, notes)
