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


@dataclass(frozen=True)
class Method:
    """``build(opts, calibration)`` makes the method's passes.

    ``measures_latency``: the passes time their candidates, and ``build`` takes two more
    keywords: ``latency`` (the shared latency table) and ``exclude`` (names of layers to leave
    as they are: the recipe rolls layers back through it). ``chooses_by_latency``: besides,
    the passes take a speed target (``opts.speedup``) and choose per layer to meet it. Other
    methods meet ``opts.ratio`` (MACs) only. ``speed_only``: the method changes nothing but
    the speed (exact replacements), so a recipe of such methods alone is always measured
    against the original and rolled back where it is not faster, with or without --speedup.
    """

    name: str
    summary: str
    build: Callable[..., list[Pass]]
    chooses_by_latency: bool = False
    measures_latency: bool = False
    speed_only: bool = False

    def __post_init__(self):
        if self.chooses_by_latency:
            object.__setattr__(self, "measures_latency", True)


def _svd(opts, calibration, latency=None, exclude=frozenset()):
    from compressor.passes.svd import LowRankSVDPass, SVDConfig

    cfg = SVDConfig(ratio=opts.ratio, rank=opts.rank, energy=opts.energy, schemes=opts.schemes,
                    rank_multiple=opts.rank_multiple, seed=opts.seed, speedup=opts.speedup,
                    exclude=frozenset(exclude))
    return [LowRankSVDPass(cfg, calibration, latency=latency)]


def _sketch(opts, calibration, latency=None, exclude=frozenset()):
    from compressor.passes.sketch import SketchConfig, TensorSketchPass

    cfg = SketchConfig(ratio=opts.ratio, sketches=opts.sketches, rows=opts.sketch_rows,
                       refit=opts.refit, seed=opts.seed)
    return [TensorSketchPass(cfg, calibration)]


def _diffconv(opts, calibration, latency=None, exclude=frozenset()):
    from compressor.passes.diffconv import DiffConvConfig, ReplaceConvWithDiffConvPass

    # --threshold wins; otherwise, with data, the threshold is chosen to meet --ratio.
    ratio = opts.ratio if opts.threshold is None and calibration is not None else None
    cfg = DiffConvConfig(threshold=opts.threshold, ratio=ratio)
    return [ReplaceConvWithDiffConvPass(cfg, calibration)]


def _prune(opts, calibration, latency=None, exclude=frozenset()):
    from compressor.errors import OptionError
    from compressor.passes.prune import PruneChannelsPass, PruneConfig

    if opts.criterion in ("activation", "reconstruction") and calibration is None:
        raise OptionError(f"--criterion {opts.criterion} needs calibration data: pass --data")
    cfg = PruneConfig(ratio=opts.ratio, criterion=opts.criterion, ranking=opts.ranking,
                      min_channels_fraction=opts.min_channels_fraction,
                      channel_multiple=opts.channel_multiple, refit=opts.refit,
                      lsh_bits=6 if opts.lsh_bits is None else opts.lsh_bits,
                      lsh_tables=4 if opts.lsh_tables is None else opts.lsh_tables,
                      seed=opts.seed, speedup=opts.speedup, exclude=frozenset(exclude))
    return [PruneChannelsPass(cfg, calibration, latency=latency)]


def _lsh(opts, calibration, latency=None, exclude=frozenset()):
    from compressor.passes.lsh_merge import LSHConfig, MergeChannelsPass

    cfg = LSHConfig(ratio=opts.ratio, bits=opts.lsh_bits, tables=opts.lsh_tables,
                    asymmetric=opts.asymmetric, refit=opts.refit,
                    min_channels_fraction=opts.min_channels_fraction, seed=opts.seed)
    return [MergeChannelsPass(cfg, calibration)]


def _lsh_conv(opts, calibration, latency=None, exclude=frozenset()):
    from compressor.passes.lsh_conv import LSHConvConfig, LSHConvPass

    cfg = LSHConvConfig(ratio=opts.ratio, bits=opts.lsh_bits, tables=opts.lsh_tables,
                        seed=opts.seed)
    return [LSHConvPass(cfg, calibration)]


def _lsh_window(opts, calibration, latency=None, exclude=frozenset()):
    from compressor.passes.lsh_window import LSHWindowConfig, LSHWindowConvPass

    cfg = LSHWindowConfig(ratio=opts.ratio, bits=opts.lsh_bits, seed=opts.seed)
    return [LSHWindowConvPass(cfg, calibration)]


def _fast_conv(opts, calibration, latency=None, exclude=frozenset()):
    from compressor.latency import LatencyContext, LatencyTable
    from compressor.passes.fast_conv import FastConvConfig, FastConvPass

    # Always by measured time (the fastest algorithm per layer), whether or not --speedup asks.
    if latency is None:
        latency = LatencyTable(LatencyContext(opts.provider, opts.threads, opts.batch))
    cfg = FastConvConfig(tolerance=opts.tolerance, exclude=frozenset(exclude),
                         int8_after=getattr(opts, "quantize", None) == "int8")
    return [FastConvPass(cfg, calibration, latency=latency)]


METHODS: dict[str, Method] = {
    "svd": Method("svd", "low-rank factorisation (channel or spatial SVD, data-aware)", _svd,
                  chooses_by_latency=True),
    "sketch": Method("sketch", "tensor sketching with random sign matrices", _sketch),
    "prune": Method("prune", "structured channel pruning (l1, l2, activation, lsh or "
                    "reconstruction criterion)",
                    _prune, chooses_by_latency=True),
    "lsh": Method("lsh", "merge similar neurons/filters found by LSH into weighted "
                  "representatives", _lsh),
    "diffconv": Method("diffconv", "differential convolution custom op (runtime_ext)", _diffconv),
    "lsh-conv": Method("lsh-conv", "per-input filter selection by LSH (CNN-SLIDE), LSHConv custom "
                       "op (runtime_ext; needs --data)", _lsh_conv),
    "lsh-window": Method("lsh-window", "grouping similar input windows by LSH, LSHWindowConv "
                         "custom op (runtime_ext; needs --data)", _lsh_window),
    "fast-conv": Method("fast-conv", "per layer, the fastest convolution algorithm by measured "
                        "latency (Winograd F(2x2)/F(4x4), FFT, direct with a fused Relu and "
                        "MaxPool: custom ops, runtime_ext) within --tolerance", _fast_conv,
                        measures_latency=True, speed_only=True),
}


def register_method(method: Method) -> None:
    """Make a method available to ``compress`` and the CLI."""
    METHODS[method.name] = method
