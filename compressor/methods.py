"""The compression methods: the one list the pipeline and the CLI read.

Each method builds its passes from the options and the calibration data; pass modules are
imported only when a method is used, so the CLI starts fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compressor.passes.base import Pass
    from compressor.passes.calibrate import Calibration
    from compressor.pipeline import CompressOptions


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    build: Callable[[CompressOptions, Calibration | None], list[Pass]]


def _svd(opts, calibration):
    from compressor.passes.svd import LowRankSVDPass, SVDConfig

    cfg = SVDConfig(ratio=opts.ratio, rank=opts.rank, energy=opts.energy, schemes=opts.schemes,
                    seed=opts.seed)
    return [LowRankSVDPass(cfg, calibration)]


def _sketch(opts, calibration):
    from compressor.passes.sketch import SketchConfig, TensorSketchPass

    cfg = SketchConfig(ratio=opts.ratio, sketches=opts.sketches, rows=opts.sketch_rows,
                       refit=opts.refit, seed=opts.seed)
    return [TensorSketchPass(cfg, calibration)]


METHODS: dict[str, Method] = {
    "svd": Method("svd", "low-rank factorisation (channel or spatial SVD, data-aware)", _svd),
    "sketch": Method("sketch", "tensor sketching with random sign matrices", _sketch),
}


def register_method(method: Method) -> None:
    """Make a method available to ``compress`` and the CLI."""
    METHODS[method.name] = method
