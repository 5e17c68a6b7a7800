"""LSH window grouping (the Differential & LSH report): Conv -> ``ai.compressor::LSHWindowConv``.

Every input window (im2col column) of a sample is hashed by ``K`` hyperplanes through the
calibration data's mean window (SimHash of the centred window: all-positive ReLU activations
would otherwise fall on the same side of most planes through the origin). Windows sharing a
code form a bucket; the filters run once per bucket, on the bucket's mean window, and every
window takes its bucket's result. Identical windows (the zero background of an image) always
share a bucket at no error, and with one window per bucket the op is exactly Conv.

Per layer the pass calibrates ``K`` and the planes (a few seeded trials) on the activations
the layer really sees: the least output error (after the ReLU that follows, when one does)
whose mean computed fraction of windows plus the hashing (``K (D + 1)`` multiplications per
window against ``M D`` for the filters) stays within ``ratio`` of the layer's MACs. Hashing
is not free: for a layer with few filters a useful ``K`` can cost more than it saves, and the
layer is then left as Conv with the reason.

``reference_lsh_window_conv`` is the numpy statement of the op the kernels are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from compressor.errors import OptionError
from compressor.passes.base import LayerRecord, Pass, PassConfig, PassResult
from compressor.passes.calibrate import Calibration
from compressor.passes.diffconv import ConvGeometry, window_patches
from compressor.passes.graph import NameScope, add_initializer
from compressor.passes.lsh_conv import (
    ConvLayer,
    activation_after,
    check_domain_import,
    conv_attributes_list,
    eligible_convs,
    expected_macs,
    finish_result,
    layer_inputs,
    output_size,
    replace_conv,
    sign_codes,
)
from compressor.profile import register_mac_counter
from compressor.runtime import OP_DOMAIN, OP_DOMAIN_VERSION

OP_TYPE = "LSHWindowConv"
MAX_BITS = 32

register_mac_counter(OP_TYPE, domain=OP_DOMAIN)(lambda node, shapes, inits: expected_macs(node, shapes))


# ---------------------------------------------------------------------------------------------
# Reference


def window_codes(patches: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """Codes [..., ] of windows [..., D] under planes [K, D + 1] (last column: offset)."""
    planes = planes.astype(np.float64)
    projections = patches.astype(np.float64) @ planes[:, :-1].T + planes[:, -1]
    return sign_codes(projections)


def first_occurrence_buckets(codes: np.ndarray) -> np.ndarray:
    """Bucket of each window [W] for codes [W]: 0, 1, ... in the order codes first occur."""
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def bucket_means(rows: np.ndarray, buckets: np.ndarray, count: int) -> np.ndarray:
    """Mean of rows [W, F] per bucket: [count, F] (float64)."""
    sums = np.zeros((count, rows.shape[1]))
    np.add.at(sums, buckets, rows)
    return sums / np.bincount(buckets, minlength=count)[:, None]


def reference_lsh_window_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                              planes: np.ndarray, geometry: ConvGeometry | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
    """LSHWindowConv in numpy (float64 sums): (Y [N, M, OH, OW] float32, buckets [N, OH, OW])."""
    geometry = geometry or ConvGeometry()
    m, _, kh, kw = weight.shape
    patches = window_patches(np.asarray(x, np.float32), (kh, kw), geometry)  # [N, OH, OW, D]
    n, oh, ow, d = patches.shape
    flat = patches.reshape(n, oh * ow, d).astype(np.float64)
    codes = window_codes(flat, planes)
    y = np.empty((n, oh * ow, m))
    buckets = np.empty((n, oh * ow), dtype=np.int64)
    w = weight.reshape(m, -1).astype(np.float64)
    for i in range(n):
        buckets[i] = first_occurrence_buckets(codes[i])
        means = bucket_means(flat[i], buckets[i], int(buckets[i].max()) + 1)
        y[i] = (means @ w.T)[buckets[i]]
    if bias is not None:
        y += np.asarray(bias, np.float64)
    y = y.reshape(n, oh, ow, m).transpose(0, 3, 1, 2)
    return y.astype(np.float32), buckets.reshape(n, oh, ow)


def make_planes(seed: int, bits: int, mean_window: np.ndarray) -> np.ndarray:
    """[K, D + 1] float32: Gaussian hyperplanes through the mean window (offset column)."""
    normals = np.random.default_rng(seed).standard_normal((bits, mean_window.size))
    offsets = -(normals @ mean_window.astype(np.float64))
    return np.concatenate([normals, offsets[:, None]], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Calibration


@dataclass
class WindowChoice:
    bits: int
    trial: int
    computed_fraction: float
    hashing_fraction: float
    error: float

    @property
    def cost(self) -> float:
        return self.computed_fraction + self.hashing_fraction


def evaluate_bits(layer: ConvLayer, x: np.ndarray, activation, bits_grid: list[int],
                  trials: int, seed: int) -> tuple[list[WindowChoice], np.ndarray]:
    """Every (K, trial) on inputs x: mean computed fraction of windows, hashing cost and the
    relative output error. Bucket outputs are bucket means of the exact outputs (the op is
    linear in the window), so no convolution is rerun per choice. Returns (choices, mean
    window)."""
    m, _, kh, kw = layer.weight.shape
    patches = window_patches(np.asarray(x, np.float32), (kh, kw), layer.geometry)
    n, oh, ow, d = patches.shape
    windows = oh * ow
    flat = torch.from_numpy(np.ascontiguousarray(patches.reshape(n, windows, d)))
    mean_window = flat.double().mean(dim=(0, 1)).numpy()
    w = torch.from_numpy(layer.weight.reshape(m, -1).copy())
    exact = flat @ w.T  # [N, windows, M] float32
    if layer.bias is not None:
        exact = exact + torch.from_numpy(layer.bias.copy())
    exact = exact.double()
    target = exact if activation is None else torch.from_numpy(activation(exact.numpy()))
    total = max(float((target ** 2).sum()), 1e-30)
    rows = exact.reshape(n * windows, m).numpy()
    target_rows = target.reshape(n * windows, m).numpy()
    max_bits = max(bits_grid)
    choices = []
    for trial in range(trials):
        planes = torch.from_numpy(make_planes(seed + 7919 * trial, max_bits, mean_window))
        bits_all = (flat @ planes[:, :-1].T + planes[:, -1]) > 0  # [N, windows, Kmax]
        keys = (torch.arange(n, dtype=torch.int64)[:, None] << 32).expand(n, windows).clone()
        for bits in range(1, max_bits + 1):
            # Key = (sample, code of the first `bits` planes): one numbering for every sample.
            keys |= bits_all[..., bits - 1].long() << (bits - 1)
            if bits not in bits_grid:
                continue
            _, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
            count = int(inverse.max()) + 1
            computed = count
            index = inverse.numpy()
            sizes = np.bincount(index, minlength=count)
            sums = np.stack([np.bincount(index, weights=rows[:, j], minlength=count)
                             for j in range(m)], axis=1)
            approx = (sums / sizes[:, None])[index]
            if activation is not None:
                approx = activation(approx)
            squared = float(((approx - target_rows) ** 2).sum())
            hashing = bits * (d + 1) / (m * d)
            choices.append(WindowChoice(bits, trial, computed / (n * windows), hashing,
                                        math.sqrt(squared / total)))
    return choices, mean_window


# ---------------------------------------------------------------------------------------------
# Pass


@dataclass(frozen=True)
class LSHWindowConfig(PassConfig):
    """ratio: fraction of each layer's MACs to keep (computed windows + hashing). bits: K for
    every layer instead of calibrating it. samples: calibration samples per layer; trials:
    random plane sets tried per K."""

    ratio: float = 0.5
    bits: int | None = None
    max_bits: int = 24
    samples: int = 32
    trials: int = 2
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise OptionError(f"lsh-window: --ratio must be in (0, 1], got {self.ratio}")
        if self.bits is not None and not 1 <= self.bits <= MAX_BITS:
            raise OptionError(f"lsh-window: --lsh-bits must be in [1, {MAX_BITS}], got {self.bits}")
        if not 1 <= self.max_bits <= MAX_BITS:
            raise OptionError(f"lsh-window: max_bits must be in [1, {MAX_BITS}]")
        if self.samples < 1 or self.trials < 1:
            raise OptionError("lsh-window: samples and trials must be >= 1")


class LSHWindowConvPass(Pass):
    """Replace eligible Conv nodes by LSHWindowConv (``--method lsh-window --ratio R``)."""

    name = "lsh-window"
    config_class = LSHWindowConfig

    def __init__(self, config: LSHWindowConfig | None = None,
                 calibration: Calibration | None = None):
        super().__init__(config)
        self.calibration = calibration

    def requires(self, model: ir.Model) -> None:
        if self.calibration is None:
            raise OptionError("lsh-window needs calibration data (--data): K and the planes' "
                              "centre are chosen on real windows")

    def call(self, model: ir.Model) -> PassResult:
        config: LSHWindowConfig = self.config
        graph = model.graph
        names = NameScope(graph)
        layers, records = eligible_convs(graph, OP_TYPE)
        bits_grid = [config.bits] if config.bits else list(range(1, config.max_bits + 1))
        notes: list[str] = []
        for index, layer in enumerate(layers):
            x = layer_inputs(self.calibration, model, layer.node.inputs[0].name, config.samples)
            activation = activation_after(layer.node)
            seed = config.seed + 1000 * index
            choices, mean_window = evaluate_bits(layer, x, activation, bits_grid, config.trials,
                                                 seed)
            within = [c for c in choices if c.cost <= config.ratio + 1e-9]
            if not within:
                cheapest = min(choices, key=lambda c: c.cost)
                records.append(LayerRecord(
                    name=layer.name, op="Conv",
                    skipped=f"no K keeps <= {config.ratio:.0%} of the MACs (cheapest: K="
                            f"{cheapest.bits} keeps {cheapest.cost:.0%}, hashing "
                            f"{cheapest.hashing_fraction:.0%})"))
                continue
            choice = min(within, key=lambda c: (round(c.error, 6), c.cost))
            planes = make_planes(seed + 7919 * choice.trial, max(bits_grid), mean_window)[:choice.bits]
            inputs = [layer.node.inputs[0], layer.node.inputs[1],
                      add_initializer(graph, names(f"{layer.name}_lsh_window_planes"), planes)]
            if layer.bias is not None:
                inputs.append(layer.node.inputs[2])
            attributes = conv_attributes_list(layer) + [ir.AttrFloat32("expected_kept", choice.cost)]
            replace_conv(graph, layer, OP_TYPE, inputs, attributes)
            model.opset_imports[OP_DOMAIN] = OP_DOMAIN_VERSION
            oh, ow = output_size(x.shape, layer)
            dense = layer.macs_per_position * oh * ow
            params = int(layer.weight.size + (0 if layer.bias is None else layer.bias.size))
            records.append(LayerRecord(
                name=layer.name, op="Conv", shape_before=tuple(layer.weight.shape),
                shape_after=tuple(layer.weight.shape), macs_before=dense,
                macs_after=int(round(dense * choice.cost)), params_before=params,
                params_after=params + planes.size, error=choice.error,
                error_basis="calibration (after its activation)" if activation else "calibration",
                detail=f"K={choice.bits}: computes {choice.computed_fraction:.1%} of the windows "
                       f"on calibration data, hashing {choice.hashing_fraction:.1%} of the MACs"))
        return finish_result(model, records, notes)

    def ensures(self, model: ir.Model) -> None:
        check_domain_import(self.name, model)
