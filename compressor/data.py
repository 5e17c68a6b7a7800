"""Calibration and evaluation data: ``.npz`` files, image folders and two named data sets.

``load_data(spec)`` accepts
- a ``.npz`` file with an array ``x`` (uint8 pixels are scaled by 1/255, floats are kept) and
  optionally integer labels ``y``;
- a folder of images (PNG, JPEG, BMP); when it has subfolders, each subfolder is a class and the
  labels number the subfolders in sorted order;
- ``fashion-mnist``: the gzip IDX files of the Debian package ``dataset-fashion-mnist``, read
  from ``/usr/share/datasets/fashion-mnist`` or ``$COMPRESSOR_FASHION_MNIST_DIR``;
- ``digits``: scikit-learn's 8x8 digits, shape ``(N, 1, 8, 8)``.

Every problem raises ``DataError`` with a message naming the file, key or data set at fault.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import DataError

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
    """Samples ``x`` (float32, ``N x per-sample shape``, images in [0, 1]) and optional labels."""

    x: np.ndarray
    y: np.ndarray | None
    name: str
    classes: tuple[str, ...] | None = None  # class names of an image folder, by label

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

    x, y = dataset.x, dataset.y
    if limit is not None:
        x = x[:limit]
        y = None if y is None else y[:limit]
    if len(x) == 0:
        raise DataError(f"{dataset.name}: the data set is empty")
    if input_shape is not None:
        x = _fit_shape(x, tuple(input_shape), dataset.name)
    if y is not None and num_classes is not None and len(y) and int(y.max()) >= num_classes:
        raise DataError(
            f"{dataset.name}: label {int(y.max())} is out of range for {num_classes} classes "
            f"(expected 0..{num_classes - 1})"
        )
    return Dataset(np.ascontiguousarray(x), y, dataset.name, dataset.classes)


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


def _as_images(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 -> float32 / 255; floats -> float32; anything else is an error."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise DataError(f"{where}: x contains NaN or infinite values")
        return x
    raise DataError(
        f"{where}: x has dtype {x.dtype}; expected uint8 pixels (0-255) or floats in [0, 1]"
    )


def _as_labels(y: np.ndarray, count: int, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{where}: y must be 1-D class indices, got shape {y.shape}")
    if len(y) != count:
        raise DataError(f"{where}: x has {count} samples but y has {len(y)} labels")
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
            if "x" not in keys:
                raise DataError(
                    f"{path}: no array 'x' in the file (keys: {', '.join(keys) or 'none'})"
                )
            x = archive["x"]
            y = archive["y"] if "y" in keys else None
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a readable .npz file (corrupt or truncated): {exc}") from exc
    if x.ndim < 1:
        raise DataError(f"{path}: x is a scalar; expected an array of samples")
    x = _as_images(x, str(path))
    if y is not None:
        y = _as_labels(y, len(x), str(path))
    return Dataset(x, y, path.name)


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
