"""Regenerate the bundled data files from the Fashion-MNIST IDX files.

    python -m compressor.models.make_data

- ``models/data/fashion_mnist_eval.npz``: the first 2000 images of the test split.
- ``models/data/fashion_mnist_calib.npz``: 512 training images, a seeded random choice.

Both hold uint8 ``x`` of shape (N, 1, 28, 28) and int64 ``y``. The output is byte-for-byte the
same on every run (the seed is fixed and the archives carry no timestamps that change).
"""

from __future__ import annotations

import argparse

import numpy as np

from compressor.data import load_fashion_mnist_raw
from compressor.models.zoo import DATA_DIR

EVAL_FILE = DATA_DIR / "fashion_mnist_eval.npz"
CALIB_FILE = DATA_DIR / "fashion_mnist_calib.npz"
EVAL_SIZE = 2000
CALIB_SIZE = 512
CALIB_SEED = 0


def calibration_indices(train_size: int, size: int = CALIB_SIZE, seed: int = CALIB_SEED):
    """The training-set indices of the calibration images (sorted)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(train_size, size=size, replace=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    DATA_DIR.mkdir(parents=True, exist_ok=True)

    test_x, test_y = load_fashion_mnist_raw("test")
    np.savez_compressed(
        EVAL_FILE, x=test_x[:EVAL_SIZE, None], y=test_y[:EVAL_SIZE].astype(np.int64)
    )
    train_x, train_y = load_fashion_mnist_raw("train")
    index = calibration_indices(len(train_x))
    np.savez_compressed(CALIB_FILE, x=train_x[index, None], y=train_y[index].astype(np.int64))
    for path in (EVAL_FILE, CALIB_FILE):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
