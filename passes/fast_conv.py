"""Fast convolution algorithms chosen per layer by measured latency (``--method fast-conv``).

Like cuDNN's algorithm search, every Conv is timed as ORT's own Conv and as each algorithm that
applies to it, on the layer's real input shape at ``--batch``, through the project's one timing
mechanism (``compressor.latency.LatencyTable``, cached on disk); each algorithm's error is the
layer's relative output error against ORT's Conv on calibration activations (random inputs
without ``--data``). The fastest algorithm whose error is within ``tolerance`` is kept; where
ORT's Conv is fastest the layer stays as it is, and so does every layer no algorithm supports
(the record says why). When the int8 stage follows (``int8_after``), custom-op nodes would stay
fp32 there, so a layer some algorithm wins in fp32 is timed once more as ORT's Conv in int8
(``quantize.int8_candidate``) and stays a Conv where that is fastest.

Algorithms: ``ai.compressor::WinogradConv`` (runtime_ext/ops/winograd_conv), F(2x2,3x3) and
F(4x4,3x3), for 3x3 stride-1, dilation-1, group-1 convolutions. It takes the Conv's own
weights and transforms them once, when onnxruntime creates the session (the graph keeps the
readable Conv weights, so passes after this one can still rewrite them; the cost is paid at
load, not per run). ``reference_winograd`` is the numpy statement of the algorithm.
``ai.compressor::Im2colConv`` (runtime_ext/ops/im2col_conv, im2col + GEMM) is the baseline,
timed only when asked for (``algorithms=(..., "im2col")``): ORT's Conv (MLAS) is itself
im2col + GEMM, so it rarely wins, and it is kept only where it is measured fastest.
``ai.compressor::FFTConv`` (runtime_ext/ops/fft_conv): overlap-save tiles through pocketfft's
rfft2 / irfft2 and a complex GEMM per frequency, for stride-1, dilation-1, group-1 convolutions;
timed on kernels larger than 3x3 only (on 3x3 Winograd F(4x4,3x3) needs fewer operations, as in
NNPACK's measurements, and 1x1 has nothing to save). Its kernel spectra are computed at the
first run. ``reference_fft_conv`` is the numpy statement of the algorithm.
``ai.compressor::DirectConv`` (runtime_ext/ops/direct_conv; CPU only): the direct convolution
vectorised over output positions for layers with few filters (or over 16 to 64 filters), any
kernel at stride 1, with the ReLU after the Conv fused into it (``activation="Relu"``) as
onnxruntime fuses it into its own Conv, and a 2x2 MaxPool after that (``pool=[2, 2]``). It wins
where MLAS's channel blocks waste vector lanes (LeNet-5's 1->6 5x5 layer: 1.9-2.4x at batch
64; its 6->16 layer about even) and loses on wide layers, where the timing keeps Conv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from compressor import runtime
from compressor.errors import OptionError
from compressor.latency import FUSED_ACTIVATIONS, sole_user
from compressor.passes.base import LayerRecord, Pass, PassConfig, PassResult
from compressor.passes.diffconv import CalibrationSource, ConvGeometry, _eligibility
from compressor.profile import register_mac_counter
from compressor.runtime import OP_DOMAIN, OP_DOMAIN_VERSION

OP_TYPE = "WinogradConv"
DEFAULT_TOLERANCE = 1e-4
# Calibration samples a layer's error is measured on.
CALIBRATION_SAMPLES = 16
# Algorithm name -> WinogradConv tile (None: Im2colConv, FFTConv, DirectConv); "conv" is ORT's.
ALGORITHMS = {"winograd2": 2, "winograd4": 4, "im2col": None, "fft": None, "direct": None}
DEFAULT_ALGORITHMS = ("winograd2", "winograd4", "fft", "direct")
CPU_ONLY = frozenset({"direct"})  # algorithms with no CUDA kernel
IM2COL_OP_TYPE = "Im2colConv"
FFT_OP_TYPE = "FFTConv"
DIRECT_OP_TYPE = "DirectConv"
LABELS = {"conv": "Conv", "winograd2": "Winograd F(2x2,3x3)", "winograd4": "Winograd F(4x4,3x3)",
          "im2col": "im2col + GEMM", "fft": "FFT", "direct": "direct", "int8": "int8 Conv"}

# ---------------------------------------------------------------------------------------------
# Reference

# Lavin & Gray's transforms: Y = A^T [(G g G^T) * (B^T d B)] A per tile.
MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], float),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], float),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], float),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]], float)),
}


def reference_winograd(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None,
                       pads: tuple[int, int, int, int] = (0, 0, 0, 0), tile: int = 4,
                       dtype=np.float64) -> np.ndarray:
    """WinogradConv as numpy, every stage in ``dtype``: input transform, the alpha^2
    tuple-wise products over channels, output transform. Returns Y [N, M, OH, OW]."""
    bt, g, at = (mat.astype(dtype) for mat in MATRICES[tile])
    m, alpha = tile, tile + 2
    n, c, h, wd = x.shape
    top, left, bottom, right = pads
    oh, ow = h + top + bottom - 2, wd + left + right - 2
    if oh < 1 or ow < 1:
        raise ValueError("the 3x3 kernel does not fit the padded input")
    th, tw = -(-oh // m), -(-ow // m)
    xp = np.zeros((n, c, th * m + 2, tw * m + 2), dtype)
    rows, cols = min(h + top, th * m + 2), min(wd + left, tw * m + 2)
    xp[:, :, top:rows, left:cols] = x[:, :, :rows - top, :cols - left]
    s = xp.strides
    d = np.lib.stride_tricks.as_strided(  # [N, C, th, tw, alpha, alpha]
        xp, (n, c, th, tw, alpha, alpha), (s[0], s[1], s[2] * m, s[3] * m, s[2], s[3]))
    v = np.einsum("ia,nctwab,jb->ijntwc", bt, d, bt)           # input transform
    u = np.einsum("ia,kcab,jb->ijck", g, w.astype(dtype), g)   # weight transform
    p = np.matmul(v.reshape(alpha, alpha, -1, c), u)           # tuple-wise GEMMs
    p = p.reshape(alpha, alpha, n, th, tw, -1)
    y = np.einsum("ia,abntwk,jb->nktiwj", at, p, at)           # output transform
    y = y.reshape(n, -1, th * m, tw * m)[:, :, :oh, :ow]
    if bias is not None:
        y = y + bias.astype(dtype)[:, None, None]
    return y


def reference_fft_conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None,
                       pads: tuple[int, int, int, int] = (0, 0, 0, 0), dtype=np.float64,
                       ) -> np.ndarray:
    """FFTConv as numpy in ``dtype`` (one transform over the whole padded map, no tiles): the
    correlation theorem, Y[n, m] = irfft2(sum_c rfft2(x[n, c]) * conj(rfft2(w[m, c]))), cut to
    the valid outputs. Returns Y [N, M, OH, OW]."""
    top, left, bottom, right = pads
    kh, kw = w.shape[2:]
    xp = np.pad(x.astype(dtype), ((0, 0), (0, 0), (top, bottom), (left, right)))
    fh, fw = xp.shape[2:]
    oh, ow = fh - kh + 1, fw - kw + 1
    if oh < 1 or ow < 1:
        raise ValueError("the kernel does not fit the padded input")
    xf = np.fft.rfft2(xp, s=(fh, fw))
    kf = np.conj(np.fft.rfft2(w.astype(dtype), s=(fh, fw)))
    y = np.fft.irfft2(np.einsum("ncuv,mcuv->nmuv", xf, kf), s=(fh, fw))[:, :, :oh, :ow]
    if bias is not None:
        y = y + bias.astype(dtype)[:, None, None]
    return y


def fft_size(kernel: tuple[int, int], out: tuple[int, int], channels: int, filters: int,
             ) -> tuple[int, int]:
    """The FFT size (Fh, Fw) FFTConv picks (runtime_ext/ops/fft_conv/fft_conv.h,
    FFTConvShape::Make, which this mirrors): 2^a 3^b sizes minimising the modelled cost
    over the overlap-save tiles (GEMM multiply-adds plus transforms weighted 10x), kernel spectra
    within 1 GiB."""
    kh, kw = kernel
    limit = max(128, 4 * max(kh, kw))
    sizes = [s for s in range(1, limit + 1) if s // (2 ** _power(s, 2) * 3 ** _power(s, 3)) == 1]
    best, choice = None, None
    for fh in (s for s in sizes if s >= kh):
        for fw in (s for s in sizes if s >= kw):
            if 16 * fh * (fw // 2 + 1) * channels * filters > 1 << 30:
                continue
            tiles = -(-out[0] // (fh - kh + 1)) * -(-out[1] // (fw - kw + 1))
            cost = tiles * (4.0 * channels * filters * fh * (fw // 2 + 1)
                            + 10.0 * (channels + filters) * fh * fw * math.log2(fh * fw))
            if best is None or cost < best:
                best, choice = cost, (fh, fw)
    if choice is None:
        raise ValueError("the kernel spectra would need more than 1 GiB at any FFT size")
    return choice


def _power(n: int, p: int) -> int:
    k = 0
    while n % p == 0:
        n //= p
        k += 1
    return k


def fft_macs(kernel: tuple[int, int], out: tuple[int, int], channels: int, filters: int) -> int:
    """Real multiply-adds of FFTConv's frequency-domain GEMMs for one image: tiles x Fh x
    (Fw / 2 + 1) complex products of C x M, 4 real each (the transforms are not counted)."""
    fh, fw = fft_size(kernel, out, channels, filters)
    tiles = -(-out[0] // (fh - kernel[0] + 1)) * -(-out[1] // (fw - kernel[1] + 1))
    return tiles * fh * (fw // 2 + 1) * channels * filters * 4


# ---------------------------------------------------------------------------------------------
# MAC counter


@register_mac_counter(OP_TYPE, domain=OP_DOMAIN)
def _winograd_macs(node, shapes, inits) -> int:
    """The multiply-adds WinogradConv performs: its alpha^2 GEMMs over every (partial) tile,
    N * tiles * alpha^2 * C * M (the transforms are mostly additions and are not counted).

    ONNX shape inference does not know WinogradConv: the output size comes from the input's."""
    attributes = {a.name: a for a in node.attribute}
    w = shapes.get(node.input[1])
    x = shapes.get(node.input[0])
    if w is None or len(w) != 4 or x is None or len(x) != 4:
        return 0
    tile = attributes["tile"].i if "tile" in attributes else 4
    pads = list(attributes["pads"].ints) if "pads" in attributes else [0, 0, 0, 0]
    oh, ow = x[2] + pads[0] + pads[2] - 2, x[3] + pads[1] + pads[3] - 2
    if not all(isinstance(v, int) for v in (oh, ow)) or oh < 1 or ow < 1:
        return 0
    tiles = math.ceil(oh / tile) * math.ceil(ow / tile)
    return tiles * (tile + 2) ** 2 * w[1] * w[0]


@register_mac_counter(IM2COL_OP_TYPE, domain=OP_DOMAIN)
@register_mac_counter(DIRECT_OP_TYPE, domain=OP_DOMAIN)
def _im2col_macs(node, shapes, inits) -> int:
    """Im2colConv and DirectConv perform the Conv's multiply-adds: each output times
    C / group * kH * kW."""
    w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
    if w is None or out is None or not all(isinstance(d, int) for d in (*w, *out)):
        return 0
    return math.prod(out) * math.prod(w[1:])


@register_mac_counter(FFT_OP_TYPE, domain=OP_DOMAIN)
def _fft_macs(node, shapes, inits) -> int:
    """FFTConv's frequency-domain multiply-adds (``fft_macs``) over the batch."""
    w, x = shapes.get(node.input[1]), shapes.get(node.input[0])
    attributes = {a.name: a for a in node.attribute}
    pads = list(attributes["pads"].ints) if "pads" in attributes else [0, 0, 0, 0]
    if w is None or x is None or len(w) != 4 or len(x) != 4 or not all(
            isinstance(d, int) for d in (*w, *x)):
        return 0
    oh, ow = x[2] + pads[0] + pads[2] - w[2] + 1, x[3] + pads[1] + pads[3] - w[3] + 1
    if oh < 1 or ow < 1:
        return 0
    return x[0] * fft_macs((w[2], w[3]), (oh, ow), w[1], w[0])


# ---------------------------------------------------------------------------------------------
# Pass


@dataclass(frozen=True)
class FastConvConfig(PassConfig):
    """``tolerance``: the largest relative output error an algorithm may have on the layer
    (||y - y_conv|| / ||y_conv||, fp32). ``algorithms``: which to try besides ORT's Conv.
    ``int8_after``: the int8 stage follows, so ORT's Conv is also timed in int8 (as that stage
    would quantize it, its neighbours fp32) and kept where that is fastest."""

    tolerance: float = DEFAULT_TOLERANCE
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    exclude: frozenset[str] = frozenset()
    # The int8 stage follows (``--quantize int8``): a layer whose Conv is faster in int8 than
    # any algorithm here stays a Conv for it (custom ops stay fp32 there).
    int8_after: bool = False

    def __post_init__(self):
        if not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise OptionError(f"fast-conv: --tolerance must be a finite number >= 0, got "
                              f"{self.tolerance}")
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown:
            raise OptionError(f"fast-conv: unknown algorithm(s) {', '.join(unknown)}: choose from "
                              + ", ".join(ALGORITHMS))


def inapplicable_reason(algorithm: str, weight: np.ndarray) -> str | None:
    """Why ``algorithm`` does not apply to a stride-1 Conv with this weight, or None."""
    kh, kw = weight.shape[2:]
    if algorithm in ("im2col", "direct"):  # Im2colConv and DirectConv compute any kernel
        return None
    if algorithm == "fft":
        if kh <= 3 and kw <= 3:
            return f"kernel {kh}x{kw}: FFT is tried on kernels larger than 3x3"
        try:
            fft_size((kh, kw), (1, 1), weight.shape[1], weight.shape[0])  # fits at the smallest size
        except ValueError as e:
            return f"FFT: {e}"
        return None
    if (kh, kw) != (3, 3):
        return f"kernel {kh}x{kw}: Winograd needs 3x3"
    return None


def timed_algorithms(algorithms: tuple[str, ...], weight: np.ndarray, provider: str,
                     ) -> tuple[str, ...]:
    """Of ``algorithms``, those timed against Conv for a stride-1 Conv with this weight on
    ``provider`` (DirectConv has no CUDA kernel)."""
    return tuple(a for a in algorithms if inapplicable_reason(a, weight) is None
                 and (provider == "cpu" or a not in CPU_ONLY))


def unsupported_reason(node: ir.Node, algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
                       ) -> tuple[ConvGeometry | None, np.ndarray | None, str | None]:
    """(geometry, weight, None) for a Conv one of ``algorithms`` computes, else (None, None,
    reason)."""
    candidate, reason = _eligibility(node)  # DiffConv's checks: constant 2-D float32, group 1
    if candidate is None:
        return None, None, reason.replace("DiffConv", OP_TYPE)
    geometry, weight = candidate.geometry, candidate.weight
    reasons = [inapplicable_reason(a, weight) for a in algorithms]
    if all(reasons):
        return None, None, "; ".join(dict.fromkeys(reasons)) or "no algorithm asked for"
    if geometry.strides != (1, 1):
        return None, None, (f"strides {list(geometry.strides)}: Winograd, FFT and direct need "
                            "stride 1")
    if geometry.dilations != (1, 1):
        return None, None, (f"dilations {list(geometry.dilations)}: Winograd, FFT and direct "
                            "need dilation 1")
    return geometry, weight, None


def fuses_relu(activation: ir.Node | None) -> bool:
    """Whether DirectConv takes ``activation`` (``fused_activation``'s) into itself: a Relu."""
    return activation is not None and activation.op_type == "Relu"


def following_pool(node: ir.Node, activation: ir.Node | None) -> ir.Node | None:
    """The MaxPool DirectConv can take into itself after ``node`` (a Conv) and its Relu
    ``activation`` (or no activation): kernel 2x2, stride 2, no pads or dilations, floor, no
    indices output, the only user of the value before it; else None."""
    if activation is not None and not fuses_relu(activation):
        return None
    pool = sole_user((activation or node).outputs[0])
    if pool is None or pool.op_type != "MaxPool" or pool.domain not in ("", "ai.onnx") or len(pool.outputs) != 1:
        return None
    a = pool.attributes

    def ints(name: str, default: list[int]) -> list[int]:
        return list(a.get_ints(name, default))

    if (ints("kernel_shape", []) != [2, 2] or ints("strides", [1, 1]) != [2, 2]
            or any(ints("pads", [0, 0, 0, 0])) or ints("dilations", [1, 1]) != [1, 1]
            or a.get_int("ceil_mode", 0) or a.get_int("storage_order", 0)
            or a.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
        return None
    return pool


def conv_neighbours(node: ir.Node, last: ir.Node) -> tuple[bool, bool]:
    """Whether the layer ``node`` reads a Conv's output (directly or through the activation
    fused into that Conv) and whether the chain it ends in (``last``: the node itself, its
    activation or its pool) feeds only a Conv. Between two Convs onnxruntime keeps MLAS's
    blocked NCHWc layout; a custom op there costs a reorder on each side, which a candidate
    timed alone would not show."""
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    if (producer is not None and producer.op_type in FUSED_ACTIVATIONS
            and producer.inputs[0] is not None):
        producer = producer.inputs[0].producer()
    before = producer is not None and producer.op_type == "Conv" and producer.domain in ("", "ai.onnx")
    user = sole_user(last.outputs[0])
    after = user is not None and user.op_type == "Conv" and user.domain in ("", "ai.onnx")
    return before, after


def in_context(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], out: str,
               channels: int, filters: int, before: bool, after: bool,
               ) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray], str, str]:
    """A candidate's nodes between 1x1 Convs standing for its Conv neighbours (``before``:
    producing its input x from ``x0``; ``after``: reading its output), filler weights: the
    layout changes a custom op costs between Convs are timed with it. Returns the nodes, the
    initializers, the model's input name and its output name."""
    nodes, inits, source = list(nodes), dict(inits), "x"
    if before:
        nodes.insert(0, helper.make_node("Conv", ["x0", "context_w0"], ["x"], name="context_before",
                                         kernel_shape=[1, 1]))
        inits["context_w0"] = np.full((channels, channels, 1, 1), 0.01, np.float32)
        source = "x0"
    if after:
        nodes.append(helper.make_node("Conv", [out, "context_w1"], ["context_y"],
                                      name="context_after", kernel_shape=[1, 1]))
        inits["context_w1"] = np.full((filters, filters, 1, 1), 0.01, np.float32)
        out = "context_y"
    return nodes, inits, source, out


def _layer_nodes(algorithm: str, geometry: ConvGeometry, has_bias: bool, activation,
                 kernel: tuple[int, int] = (3, 3), pool: ir.Node | None = None,
                 ) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray], str]:
    """The candidate's nodes reading x (w, b) and its output: the algorithm's node, then the
    activation ORT fuses with a Conv, then ``pool`` (a MaxPool after them), except where
    DirectConv takes them into itself."""
    from compressor.latency import activation_nodes

    inputs = ["x", "w"] + (["b"] if has_bias else [])
    pads = list(geometry.pads)
    if algorithm == "direct":
        relu = fuses_relu(activation)
        extra = dict(pool=[2, 2]) if pool is not None else {}
        node = helper.make_node(DIRECT_OP_TYPE, inputs, ["z"], name="layer", domain=OP_DOMAIN,
                                pads=pads, kernel_shape=list(kernel),
                                activation="Relu" if relu else "", **extra)
        if relu or activation is None:
            return [node], {}, "z"
    elif algorithm == "fft":
        node = helper.make_node(FFT_OP_TYPE, inputs, ["z"], name="layer", domain=OP_DOMAIN,
                                pads=pads, kernel_shape=list(kernel))
    elif algorithm in ("conv", "im2col"):
        node = helper.make_node("Conv" if algorithm == "conv" else IM2COL_OP_TYPE, inputs, ["z"],
                                name="layer", kernel_shape=list(kernel), pads=pads, strides=[1, 1],
                                dilations=[1, 1], domain="" if algorithm == "conv" else OP_DOMAIN)
    else:
        node = helper.make_node(OP_TYPE, inputs, ["z"], name="layer", domain=OP_DOMAIN,
                                pads=pads, tile=ALGORITHMS[algorithm])
    act, inits, out = activation_nodes(activation, "z", "y")
    nodes = [node, *act]
    if pool is not None:
        nodes.append(helper.make_node("MaxPool", [out], ["pooled"], name="pool",
                                      kernel_shape=[2, 2], strides=[2, 2]))
        out = "pooled"
    return nodes, inits, out


class FastConvPass(Pass):
    """Replace each Conv by its fastest algorithm within tolerance (``--method fast-conv``)."""

    name = "fast-conv"
    config_class = FastConvConfig

    def __init__(self, config: FastConvConfig | None = None,
                 calibration: CalibrationSource | None = None, latency=None):
        super().__init__(config)
        self.calibration = calibration
        self.latency = latency

    def call(self, model: ir.Model) -> PassResult:
        from compressor.latency import (
            WHOLE_MODEL_MIN_TIME_S,
            LatencyTable,
            predicted_whole_ms,
            prediction_stats,
        )

        if self.latency is None:
            self.latency = LatencyTable()
        config: FastConvConfig = self.config
        graph = model.graph
        opset = model.opset_imports.get("", 18)
        records: list[LayerRecord] = []
        layers = []
        for node in list(graph):
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                continue
            name = node.name or f"Conv_{len(records) + len(layers)}"
            if name in config.exclude:
                records.append(LayerRecord(name=name, op="Conv", skipped="excluded"))
                continue
            geometry, weight, reason = unsupported_reason(node, config.algorithms)
            if reason is not None:
                records.append(LayerRecord(name=name, op="Conv",
                                           skipped=f"kept ORT's Conv: {reason}"))
                continue
            layers.append((name, node, geometry, weight))

        # the model as it was, timed whole for the prediction if a layer is replaced
        before = ir.serde.serialize_model(model) if layers else None
        activations: dict[str, np.ndarray] = {}
        if self.calibration is not None and layers:
            activations = self.calibration.collect(model, [n.inputs[0].name for _, n, _, _ in layers])
        for name, node, geometry, weight in layers:
            records.append(self._choose(graph, name, node, geometry, weight, opset,
                                        activations.get(node.inputs[0].name)))

        changed = [r for r in records if r.skipped is None]
        if changed:
            model.opset_imports[OP_DOMAIN] = OP_DOMAIN_VERSION
        stats = {
            "replaced": len(changed),
            "kept": len(records) - len(changed),
            "macs_before": sum(r.macs_before for r in changed),
            "macs_after": sum(r.macs_after for r in changed),
        }
        if changed:  # the prediction every latency-driven pass reports (the recipe reads it)
            whole_ms = self.latency.time(before, min_time_s=WHOLE_MODEL_MIN_TIME_S)
            predicted = predicted_whole_ms(whole_ms, sum(r.latency_before_ms for r in changed),
                                           sum(r.latency_after_ms for r in changed))
            stats.update(prediction_stats(whole_ms, predicted))
        return PassResult(model=model, modified=bool(changed), layers=records, stats=stats)

    def _choose(self, graph: ir.Graph, name: str, node: ir.Node, geometry: ConvGeometry,
                weight: np.ndarray, opset: int, activation_input: np.ndarray | None) -> LayerRecord:
        from compressor.latency import candidate_model, filler, fused_activation

        config: FastConvConfig = self.config
        table = self.latency
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = None
        if has_bias:
            bias_tensor = ir.convenience.get_const_tensor(node.inputs[2])
            if bias_tensor is None:
                return LayerRecord(name=name, op="Conv", skipped="kept ORT's Conv: bias is not a "
                                   "constant")
            bias = bias_tensor.numpy().astype(np.float32)
        in_shape = node.inputs[0].shape
        if activation_input is not None:
            chw = tuple(int(d) for d in activation_input.shape[1:])
        elif in_shape is not None and len(in_shape) == 4 and all(isinstance(d, int) for d in in_shape[1:]):
            chw = tuple(int(d) for d in in_shape[1:])
        else:
            return LayerRecord(name=name, op="Conv", skipped="kept ORT's Conv: input shape unknown")
        m, c, kh, kw = weight.shape
        kernel = (kh, kw)
        candidates = timed_algorithms(config.algorithms, weight, table.context.provider)
        oh = chw[1] + geometry.pads[0] + geometry.pads[2] - kh + 1
        ow = chw[2] + geometry.pads[1] + geometry.pads[3] - kw + 1
        opsets = [helper.make_opsetid("", opset), helper.make_opsetid(OP_DOMAIN, OP_DOMAIN_VERSION)]
        fused = fused_activation(node)
        pool = following_pool(node, fused) if "direct" in candidates else None
        before, after = conv_neighbours(node, pool or fused or node)

        # Time every algorithm as it will run (with the activation ORT fuses into its Conv,
        # and the MaxPool after it where DirectConv could take it in). Side by side
        # (time_all): the choice and the prediction are ratios between them.
        # Between Conv neighbours, 1x1 Convs stand for them (in_context).
        protos = []
        for algorithm in ("conv", *candidates):
            nodes, inits, out = _layer_nodes(algorithm, geometry, has_bias, fused, kernel, pool)
            inits.update({"w": filler(weight.shape)})
            if has_bias:
                inits["b"] = filler((m,))
            nodes, inits, source, out = in_context(nodes, inits, out, chw[0], m, before, after)
            protos.append(candidate_model(nodes, {source: ((table.context.batch, *chw), np.float32)},
                                          {out: (None, np.float32)}, inits, opsets))
        times = dict(zip(("conv", *candidates), table.time_all(protos), strict=True))
        int8_note = None
        if config.int8_after and min(times, key=times.get) != "conv":
            int8_ms, int8_note = self._time_int8(protos[0], (table.context.batch, *chw))
            if int8_ms is not None:
                times["int8"] = int8_ms

        # Each algorithm's error against ORT's Conv on the layer's real inputs.
        if activation_input is not None:
            x = np.ascontiguousarray(activation_input[:CALIBRATION_SAMPLES], dtype=np.float32)
            basis = "calibration"
        else:
            x = np.random.default_rng(0).standard_normal((4, *chw)).astype(np.float32)
            basis = "random"
        outputs = {}
        for algorithm in ("conv", *candidates):
            nodes, _, _ = _layer_nodes(algorithm, geometry, has_bias, None, kernel)
            inits = {"w": weight} | ({"b": bias} if has_bias else {})
            proto = candidate_model(nodes, {"x": (x.shape, np.float32)}, {"z": (None, np.float32)},
                                    inits, opsets)
            outputs[algorithm] = runtime.session(proto, table.context.provider).run(None, {"x": x})[0]
        norm = float(np.linalg.norm(outputs["conv"]))
        errors = {a: (float(np.linalg.norm(outputs[a] - outputs["conv"])) / norm if norm > 0 else 0.0)
                  for a in candidates}

        allowed = ["conv"] + [a for a in candidates if errors[a] <= config.tolerance]
        # the int8 stage bounds int8's error itself (and keeps the Conv fp32 beyond it)
        allowed += ["int8"] if "int8" in times else []
        best = min(allowed, key=lambda a: times[a])
        timing = ", ".join(f"{LABELS[a]} {times[a]:.3g} ms" for a in ("conv", *candidates))
        if "int8" in times:
            timing += f", {LABELS['int8']} {times['int8']:.3g} ms"
        too_far = [a for a in candidates if errors[a] > config.tolerance]
        error_note = "; ".join(f"{LABELS[a]} error {errors[a]:.2g} > tolerance" for a in too_far)
        dense = m * c * kh * kw * oh * ow
        params = int(weight.size) + (m if has_bias else 0)
        common = dict(name=name, op="Conv", shape_before=tuple(weight.shape),
                      shape_after=tuple(weight.shape), macs_before=dense, params_before=params,
                      params_after=params, latency_before_ms=times["conv"],
                      latency_after_ms=times[best], error_basis=basis)
        if best in ("conv", "int8"):
            reason = (f"kept ORT's Conv: it is fastest ({timing})" if best == "conv" else
                      f"kept ORT's Conv for the int8 stage: its int8 form is fastest ({timing})")
            for note in (error_note, int8_note):
                if note:
                    reason += f"; {note}"
            return LayerRecord(**common, macs_after=dense, error=0.0, skipped=reason)

        tile = ALGORITHMS[best]
        attributes = [ir.AttrInt64s("pads", list(geometry.pads)),
                      ir.AttrInt64s("kernel_shape", list(kernel))]
        replaced, old_out = [node], node.outputs[0]
        if best == "fft":
            op_type, macs = FFT_OP_TYPE, fft_macs(kernel, (oh, ow), c, m)
        elif best == "direct":
            op_type, macs = DIRECT_OP_TYPE, dense
            if fuses_relu(fused):  # the Relu after the Conv runs inside DirectConv
                attributes.append(ir.AttrString("activation", "Relu"))
                replaced, old_out = [node, fused], fused.outputs[0]
            if pool is not None:  # and so does the MaxPool after them
                attributes.append(ir.AttrInt64s("pool", [2, 2]))
                replaced, old_out = [*replaced, pool], pool.outputs[0]
        elif tile is None:  # Im2colConv: the Conv's own MACs
            op_type, macs = IM2COL_OP_TYPE, dense
        else:
            op_type = OP_TYPE
            attributes.append(ir.AttrInt64("tile", tile))
            macs = math.ceil(oh / tile) * math.ceil(ow / tile) * (tile + 2) ** 2 * c * m
        new = ir.Node(OP_DOMAIN, op_type, list(node.inputs[:3]), attributes, num_outputs=1,
                      name=node.name)
        new_out = new.outputs[0]
        new_out.shape, new_out.type = old_out.shape, old_out.type
        ir.convenience.replace_nodes_and_values(graph, node, replaced, [new], [old_out], [new_out])
        new_out.name = old_out.name
        detail = f"{LABELS[best]} ({timing}); error {errors[best]:.2g}"
        if len(replaced) > 1:
            fused_in = " and ".join(n.op_type for n in replaced[1:])
            detail += f"; the {fused_in} after it fused in"
        for note in (error_note, int8_note):
            if note:
                detail += f"; {note}"
        return LayerRecord(**common, macs_after=macs, error=errors[best], detail=detail)

    def _time_int8(self, conv: onnx.ModelProto, shape: tuple[int, ...]
                   ) -> tuple[float | None, str | None]:
        """The time of ``conv`` (the layer's ORT Conv candidate, in context) with the layer in
        int8 as the int8 stage would quantize it, beside ``conv`` itself; or None and why
        not. Its stand-in neighbours stay fp32, like the int8 stage's own per-node timing."""
        from compressor.passes.quantize import int8_candidate

        feed = {conv.graph.input[0].name:
                np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        try:
            int8 = int8_candidate(conv, feed, excluded=("context_before", "context_after"))
            _, int8_ms = self.latency.time_all([conv, int8])
        except Exception as e:  # noqa: BLE001 - the quantizer's errors are many and untyped
            return None, f"int8 Conv not timed ({type(e).__name__}: {e})"
        return float(int8_ms), None

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if (node.op_type in (OP_TYPE, IM2COL_OP_TYPE, FFT_OP_TYPE, DIRECT_OP_TYPE)
                    and node.domain == OP_DOMAIN):
                if OP_DOMAIN not in model.opset_imports:
                    from compressor.errors import PassError

                    raise PassError(self.name, f"{node.op_type} nodes without an opset import for "
                                    f"{OP_DOMAIN}")
                return
