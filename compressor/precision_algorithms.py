"""Convolution and matmul algorithms with reduced-precision arithmetic emulated in numpy.

Each algorithm computes a layer's output from its input ``x`` and constant weight; a
``NumberFormat`` says where a real kernel stores values and so where they are rounded:

* ``fp64``: everything in float64 (the reference; the algorithms agree to ~1e-12 there).
* ``fp32``: operands and every stored intermediate in float32, arithmetic in float32.
* ``fp16`` / ``bf16``: operands and every stored intermediate (transformed tiles, spectra,
  low-rank intermediates, logarithms, the output) rounded to the format; products of two
  such values are exact in float32 (11 + 11 or 8 + 8 significand bits), and sums accumulate
  in float32, as tensor cores and real half-precision kernels do (numpy's float32 BLAS).
  fp16 rounds via ``numpy.float16``; bf16 rounds float32 to nearest-even on its top 16 bits.
* ``int8``: symmetric per-output-channel weights and a per-tensor activation scale (max |x|
  over the layer's calibration input / 127), products summed in int32 (computed exactly in
  float64 and checked against int32's range), then dequantised; the bias is added in float32
  after dequantisation. Only algorithms whose operands stay integers support it.

Operands transformed offline (Winograd's U = G g G^T, the weight's spectrum, SVD factors)
are computed in float64 and then rounded once, as a library does at load time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.fft

from compressor.passes.diffconv import ConvGeometry, window_patches
from compressor.passes.fast_conv import MATRICES

INT8_MAX = 127
INT32_RANGE = (-(2**31), 2**31 - 1)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (nearest, ties to even on the top 16 bits of float32), kept
    as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) \
        & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


@dataclass(frozen=True)
class NumberFormat:
    """Where values are stored (``store``) and what arithmetic runs in (``compute``)."""

    name: str
    compute: type
    store: Callable[[np.ndarray], np.ndarray]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x`` as stored in this format (complex: real and imaginary parts apart)."""
        if np.iscomplexobj(x):
            complex_type = np.complex128 if self.compute is np.float64 else np.complex64
            return (self(x.real) + 1j * self(x.imag)).astype(complex_type)
        return self.store(np.asarray(x, dtype=self.compute))


FORMATS: dict[str, NumberFormat] = {
    "fp64": NumberFormat("fp64", np.float64, lambda x: x),
    "fp32": NumberFormat("fp32", np.float32, lambda x: x.astype(np.float32)),
    "fp16": NumberFormat("fp16", np.float32, lambda x: x.astype(np.float16).astype(np.float32)),
    "bf16": NumberFormat("bf16", np.float32, round_bf16),
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # what the study reports, fewest errors first


class NotApplicable(Exception):
    """The algorithm does not apply to this layer or precision (the message says why)."""


@dataclass(frozen=True)
class Layer:
    """A Conv (weight [M, C/group, kH, kW]) or a matmul (weight [K, M]: y = x @ W + b)."""

    name: str
    op: str  # "Conv" | "Gemm" | "MatMul"
    weight: np.ndarray
    bias: np.ndarray | None = None
    geometry: ConvGeometry = ConvGeometry()
    group: int = 1

    @property
    def is_conv(self) -> bool:
        return self.op == "Conv"


# ------------------------------------------------------------------------------ int8


def quantize_symmetric(a: np.ndarray, axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values as float64, scale): symmetric, one scale per index of ``axis`` (None: per
    tensor). A zero channel gets scale 1."""
    reduce = None if axis is None else tuple(i for i in range(a.ndim) if i != axis)
    peak = np.max(np.abs(a), axis=reduce, keepdims=True).astype(np.float64)
    scale = np.where(peak > 0, peak / INT8_MAX, 1.0)
    return np.clip(np.rint(a / scale), -INT8_MAX, INT8_MAX), scale


def int32_accumulate(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """rows @ columns of int8 values, exact (float64 holds every sum of int8 products below
    2^53), checked to fit int32 as a real kernel's accumulator must."""
    acc = rows @ columns
    if acc.size and (acc.min() < INT32_RANGE[0] or acc.max() > INT32_RANGE[1]):
        raise NotApplicable("int32 accumulator overflow")
    return acc


# ------------------------------------------------------------------------------ helpers


def _output_size(layer: Layer, x: np.ndarray) -> tuple[int, int]:
    kh, kw = layer.weight.shape[2:]
    (sh, sw), (dh, dw) = layer.geometry.strides, layer.geometry.dilations
    top, left, bottom, right = layer.geometry.pads
    oh = (x.shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
    return oh, ow


def _finish(y: np.ndarray, layer: Layer, fmt: NumberFormat, channel_axis: int) -> np.ndarray:
    """Add the bias in the compute type and store the output in the format."""
    if layer.bias is not None:
        shape = [1] * y.ndim
        shape[channel_axis] = -1
        y = y + layer.bias.astype(fmt.compute).reshape(shape)
    return fmt(y)


def _patch_rows(layer: Layer, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """im2col rows [N*OH*OW, C*kH*kW] of a conv (the rows of a matmul), and the output's
    leading shape."""
    if not layer.is_conv:
        return x.reshape(-1, x.shape[-1]), x.shape[:-1]
    patches = window_patches(x, tuple(layer.weight.shape[2:]), layer.geometry)
    return patches.reshape(-1, patches.shape[-1]), patches.shape[:3]


def _gemm_weights(layer: Layer) -> list[np.ndarray]:
    """The weight of each group as a [K, M] matrix (a matmul has one group)."""
    if not layer.is_conv:
        return [layer.weight]
    m = layer.weight.shape[0]
    per_group = m // layer.group
    flat = layer.weight.reshape(m, -1)
    return [flat[g * per_group:(g + 1) * per_group].T for g in range(layer.group)]


def _grouped_gemm(layer: Layer, x: np.ndarray, gemm: Callable[[np.ndarray, np.ndarray, int],
                  np.ndarray]) -> np.ndarray:
    """Run ``gemm(rows, weight [K, M], group)`` on each group's im2col rows; the layer's
    output (NCHW for a conv) before bias."""
    rows, lead = _patch_rows(layer, x)
    weights = _gemm_weights(layer)
    k = rows.shape[1] // len(weights)
    out = np.concatenate([gemm(rows[:, g * k:(g + 1) * k], w, g)
                          for g, w in enumerate(weights)], axis=1)
    out = out.reshape(*lead, -1)
    return out.transpose(0, 3, 1, 2) if layer.is_conv else out


# ------------------------------------------------------------------------------ algorithms


def direct(layer: Layer, x: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """Direct convolution: one channel contraction per kernel tap, accumulated over the taps
    (a matmul: the plain product)."""
    xs, w = fmt(x), fmt(layer.weight)
    if not layer.is_conv:
        return _finish(xs @ w, layer, fmt, -1)
    n, c, _, _ = x.shape
    m, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = layer.geometry.strides, layer.geometry.dilations
    top, left, bottom, right = layer.geometry.pads
    oh, ow = _output_size(layer, x)
    xp = np.pad(xs, ((0, 0), (0, 0), (top, bottom), (left, right)))
    mg = m // layer.group
    y = np.zeros((n, m, oh, ow), fmt.compute)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                        j * dw:j * dw + sw * (ow - 1) + 1:sw]
            for g in range(layer.group):
                y[:, g * mg:(g + 1) * mg] += np.einsum(
                    "nchw,mc->nmhw", window[:, g * cg:(g + 1) * cg],
                    w[g * mg:(g + 1) * mg, :, i, j], optimize=True)
    return _finish(y, layer, fmt, 1)


def im2col(layer: Layer, x: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """im2col + GEMM: unfold every window into a row, then one GEMM per group."""
    if not layer.is_conv:
        raise NotApplicable("not a convolution (a matmul has no windows to unfold)")
    xs, w = fmt(x), fmt(layer.weight)
    y = _grouped_gemm(Layer(layer.name, "Conv", w, None, layer.geometry, layer.group), xs,
                      lambda rows, wg, g: rows @ wg)
    return _finish(y, layer, fmt, 1)


def winograd_applies(layer: Layer) -> str | None:
    """Why Winograd F(m x m, 3x3) does not apply, or None."""
    if not layer.is_conv:
        return "not a convolution"
    if layer.weight.shape[2:] != (3, 3):
        return f"kernel {layer.weight.shape[2]}x{layer.weight.shape[3]}: needs 3x3"
    if layer.geometry.strides != (1, 1):
        return f"strides {list(layer.geometry.strides)}: needs stride 1"
    if layer.geometry.dilations != (1, 1):
        return f"dilations {list(layer.geometry.dilations)}: needs dilation 1"
    if layer.group != 1:
        return f"group={layer.group}: needs group 1"
    return None


def winograd(layer: Layer, x: np.ndarray, fmt: NumberFormat, tile: int) -> np.ndarray:
    """Winograd F(tile x tile, 3x3), NNPACK's three stages: input transform V = B^T d B
    (computed from stored inputs, stored), tuple-wise GEMMs over channels (stored), output
    transform Y = A^T M A; U = G g G^T is computed offline in float64 and stored."""
    reason = winograd_applies(layer)
    if reason is not None:
        raise NotApplicable(reason)
    bt, g, at = MATRICES[tile]
    alpha = tile + 2
    n, c, h, wd = x.shape
    top, left, bottom, right = layer.geometry.pads
    oh, ow = h + top + bottom - 2, wd + left + right - 2
    th, tw = -(-oh // tile), -(-ow // tile)
    xp = np.zeros((n, c, th * tile + 2, tw * tile + 2), fmt.compute)
    rows, cols = min(h + top, th * tile + 2), min(wd + left, tw * tile + 2)
    xp[:, :, top:rows, left:cols] = fmt(x)[:, :, :rows - top, :cols - left]
    tiles = np.lib.stride_tricks.sliding_window_view(xp, (alpha, alpha), axis=(2, 3))
    tiles = tiles[:, :, ::tile, ::tile][:, :, :th, :tw]          # [N, C, th, tw, a, a]
    bt_c, at_c = bt.astype(fmt.compute), at.astype(fmt.compute)
    v = fmt(np.einsum("ia,nctwab,jb->ijntwc", bt_c, tiles, bt_c, optimize=True))
    u = fmt(np.einsum("ia,kcab,jb->ijck", g, layer.weight.astype(np.float64), g))
    products = fmt(np.matmul(v.reshape(alpha, alpha, -1, c), u))  # [a, a, N*th*tw, M]
    products = products.reshape(alpha, alpha, n, th, tw, -1)
    y = np.einsum("ia,abntwk,jb->nktiwj", at_c, products, at_c, optimize=True)
    y = y.reshape(n, -1, th * tile, tw * tile)[:, :, :oh, :ow]
    return _finish(y, layer, fmt, 1)


def fft(layer: Layer, x: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """FFT convolution: spectra of the padded input (computed from stored inputs, stored)
    and of the flipped kernel (offline), products summed over channels (stored), inverse
    FFT; strides and dilations by subsampling and dilating. FFT butterflies run in the
    compute type (float32 for fp16/bf16: cuFFT-style half FFTs are not emulated)."""
    if not layer.is_conv:
        raise NotApplicable("not a convolution")
    if layer.group != 1:
        raise NotApplicable(f"group={layer.group}: one spectrum per group is not emulated")
    n, c, h, wd = x.shape
    m, _, kh, kw = layer.weight.shape
    (sh, sw), (dh, dw) = layer.geometry.strides, layer.geometry.dilations
    top, left, bottom, right = layer.geometry.pads
    xp = np.pad(fmt(x), ((0, 0), (0, 0), (top, bottom), (left, right)))
    dilated = np.zeros((m, c, dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    dilated[:, :, ::dh, ::dw] = layer.weight
    ekh, ekw = dilated.shape[2:]
    size = (xp.shape[2], xp.shape[3])  # linear correlation fits: the kernel is no larger
    x_hat = fmt(scipy.fft.rfft2(xp, s=size))                       # [N, C, H, W/2+1]
    w_hat = fmt(np.conj(scipy.fft.rfft2(dilated, s=size)))         # correlation, offline
    y_hat = fmt(np.einsum("nchw,mchw->nmhw", x_hat, w_hat, optimize=True))
    full = scipy.fft.irfft2(y_hat, s=size)
    oh, ow = _output_size(layer, x)
    y = full[:, :, :sh * (oh - 1) + 1:sh, :sw * (ow - 1) + 1:sw]
    assert y.shape[2:] == (oh, ow) and ekh <= size[0] and ekw <= size[1]
    return _finish(y.astype(fmt.compute), layer, fmt, 1)


def svd_factors(weight: np.ndarray, rank_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(A [K, r], B [r, M]) with A @ B the best rank-r approximation of ``weight`` [K, M],
    r = max(1, round(fraction * min(K, M))); float64, singular values split evenly."""
    u, s, vt = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
    r = max(1, round(rank_fraction * len(s)))
    root = np.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r]


def svd(layer: Layer, x: np.ndarray, fmt: NumberFormat, rank_fraction: float) -> np.ndarray:
    """Low-rank product: rows @ A (stored) @ B, for each group's [K, M] weight."""
    def gemm(rows, w, g):
        a, b = svd_factors(w, rank_fraction)
        return fmt(fmt(rows) @ fmt(a)) @ fmt(b)

    return _finish(_grouped_gemm(layer, x, gemm), layer, fmt, 1 if layer.is_conv else -1)


# ------------------------------------------------------------------------------ log domain

LOG_ROW_CHUNK = 256  # rows per [rows, K, M] block of log-domain products


def _signed_logs(a: np.ndarray, fmt: NumberFormat) -> tuple[np.ndarray, np.ndarray]:
    """(log2 |a| stored in the format, sign in {-1, 0, 1}) of stored values."""
    stored = fmt(a)
    with np.errstate(divide="ignore"):
        return fmt(np.log2(np.abs(stored))), np.sign(stored)


def log_matmul(rows: np.ndarray, w: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """rows @ w with every product formed as a sum of logarithms (log2|x| + log2|w|, stored;
    sign tracked apart), converted back (2^s) and summed linearly in the compute type."""
    lx, sx = _signed_logs(rows, fmt)
    lw, sw = _signed_logs(w, fmt)
    out = np.empty((rows.shape[0], w.shape[1]), fmt.compute)
    for start in range(0, rows.shape[0], LOG_ROW_CHUNK):
        part = slice(start, start + LOG_ROW_CHUNK)
        exponent = fmt(lx[part, :, None] + lw[None])               # -inf where a zero
        products = np.exp2(exponent) * (sx[part, :, None] * sw[None])
        out[part] = products.sum(axis=1, dtype=fmt.compute)
    return out


@dataclass(frozen=True)
class LogAddTable:
    """log2(1 + 2^-d) and log2(1 - 2^-d) sampled at ``entries`` points d in [0, ``reach``)
    (nearest entry below d; 0 at and beyond ``reach``): log2(a + b) = max + correction.
    ``entries=None`` computes the corrections exactly (the float64 check)."""

    entries: int | None = 64
    reach: float = 8.0

    def corrections(self, d: np.ndarray, same_sign: np.ndarray) -> np.ndarray:
        if self.entries is not None:
            step = self.reach / self.entries
            d = np.where(d < self.reach, np.floor(d / step) * step, np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            plus = np.log2(1 + np.exp2(-d))
            minus = np.log2(-np.expm1(-d * np.log(2)))   # -inf at d = 0: exact cancellation
        return np.where(same_sign, plus, minus)


def log_add(la, sa, lb, sb, table: LogAddTable, fmt: NumberFormat):
    """(log2|a + b|, sign(a + b)) from signed logarithms, by max + correction(|la - lb|)."""
    big = la >= lb
    top, top_sign = np.where(big, la, lb), np.where(big, sa, sb)
    with np.errstate(invalid="ignore"):
        d = np.abs(la - lb)
    d = np.where(np.isneginf(la) | np.isneginf(lb), np.inf, d)  # a zero operand: correction 0
    d = np.where(np.isneginf(la) & np.isneginf(lb), np.inf, d)
    result = fmt(top + fmt(table.corrections(d, sa * sb >= 0)))
    zero = np.isneginf(result) | (sa == 0) & (sb == 0)
    return np.where(zero, -np.inf, result), np.where(zero, 0, top_sign)


def log_add_matmul(rows: np.ndarray, w: np.ndarray, fmt: NumberFormat,
                   table: LogAddTable) -> np.ndarray:
    """rows @ w entirely in the log domain: products as sums of logarithms, and the sum over
    K as a pairwise tree of approximate log-domain additions (``LogAddTable``), each partial
    sum stored in the format; one conversion 2^L at the end."""
    lx, sx = _signed_logs(rows, fmt)
    lw, sw = _signed_logs(w, fmt)
    out = np.empty((rows.shape[0], w.shape[1]), fmt.compute)
    for start in range(0, rows.shape[0], LOG_ROW_CHUNK):
        part = slice(start, start + LOG_ROW_CHUNK)
        logs = fmt(lx[part, :, None] + lw[None])
        signs = sx[part, :, None] * sw[None]
        logs = np.where(signs == 0, -np.inf, logs)
        while logs.shape[1] > 1:
            if logs.shape[1] % 2:
                logs = np.concatenate([logs, np.full_like(logs[:, :1], -np.inf)], axis=1)
                signs = np.concatenate([signs, np.zeros_like(signs[:, :1])], axis=1)
            logs, signs = log_add(logs[:, 0::2], signs[:, 0::2], logs[:, 1::2], signs[:, 1::2],
                                  table, fmt)
        out[part] = (signs[:, 0] * np.exp2(logs[:, 0])).astype(fmt.compute)
    return out


def log_domain(layer: Layer, x: np.ndarray, fmt: NumberFormat,
               table: LogAddTable | None = None) -> np.ndarray:
    """Log-domain matmul on the im2col rows (``table``: also the additions in the log
    domain)."""
    def gemm(rows, w, g):
        return log_matmul(rows, w, fmt) if table is None else log_add_matmul(rows, w, fmt, table)

    return _finish(_grouped_gemm(layer, x, gemm), layer, fmt, 1 if layer.is_conv else -1)


# ------------------------------------------------------------------------------ int8 paths


def int8_gemm_layer(layer: Layer, x: np.ndarray, activation_scale: float,
                    rank_fraction: float | None = None) -> np.ndarray:
    """The layer in int8 (see the module docstring): im2col rows times per-channel int8
    weights in int32; with ``rank_fraction``, the two SVD factors, the intermediate
    requantised per tensor to int8 between them (its scale from its own max |value|)."""
    q_x = np.clip(np.rint(x / activation_scale), -INT8_MAX, INT8_MAX)

    def gemm(rows, w, g):
        if rank_fraction is None:
            q_w, scale_w = quantize_symmetric(w, axis=1)
            return int32_accumulate(rows, q_w) * activation_scale * scale_w
        a, b = svd_factors(w, rank_fraction)
        q_a, scale_a = quantize_symmetric(a, axis=1)
        t = int32_accumulate(rows, q_a) * activation_scale * scale_a
        q_t, scale_t = quantize_symmetric(t)
        q_b, scale_b = quantize_symmetric(b, axis=1)
        return int32_accumulate(q_t, q_b) * scale_t * scale_b

    y = _grouped_gemm(layer, q_x, gemm).astype(np.float32)
    return _finish(y, layer, FORMATS["fp32"], 1 if layer.is_conv else -1)
