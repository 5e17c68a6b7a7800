"""Differential convolution: replace Conv nodes with ``ai.compressor::DiffConv``.

Along each output row, DiffConv computes the first window (and every ``restart``-th) directly
and each next window as the previous result plus the kernel applied to the difference between
the new and the old input patches, skipping differences with ``|d| <= threshold``. Threshold 0
is exact up to rounding; a larger threshold trades accuracy for skipped multiplications.

``reference_diffconv`` is the plain numpy statement of the algorithm that the compiled kernels
(runtime_ext/ops/diffconv) are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from compressor.errors import OptionError
from compressor.passes.base import LayerRecord, Pass, PassConfig, PassResult
from compressor.profile import register_mac_counter
from compressor.runtime import OP_DOMAIN, OP_DOMAIN_VERSION

OP_TYPE = "DiffConv"
DEFAULT_RESTART = 16
# Samples of calibration data used to choose thresholds and measure the error.
CALIBRATION_SAMPLES = 16


# ---------------------------------------------------------------------------------------------
# Reference


@dataclass(frozen=True)
class ConvGeometry:
    """Conv attributes of a 2-D convolution, explicit pads [top, left, bottom, right]."""

    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)


def window_patches(x: np.ndarray, kernel: tuple[int, int], geometry: ConvGeometry) -> np.ndarray:
    """Input patch of every output window: [N, OH, OW, C*kH*kW] (k ordered as c, kh, kw)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    (sh, sw), (dh, dw) = geometry.strides, geometry.dilations
    top, left, bottom, right = geometry.pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError("kernel does not fit the padded input")
    s = xp.strides
    view = np.lib.stride_tricks.as_strided(
        xp,
        shape=(n, oh, ow, c, kh, kw),
        strides=(s[0], s[2] * sh, s[3] * sw, s[1], s[2] * dh, s[3] * dw),
        writeable=False,
    )
    return view.reshape(n, oh, ow, c * kh * kw)


def window_differences(
    patches: np.ndarray, threshold: float, restart: int = DEFAULT_RESTART
) -> tuple[np.ndarray, np.ndarray]:
    """What the algorithm multiplies: restart windows keep their patch, every other window
    holds its patch minus the previous window's, with ``|d| <= threshold`` zeroed (float32, as
    the kernels compute it). Returns (terms, kept mask of the non-restart differences)."""
    patches = patches.astype(np.float32, copy=False)
    terms = patches.copy()
    terms[:, :, 1:] = patches[:, :, 1:] - patches[:, :, :-1]
    restart_cols = np.arange(patches.shape[2]) % restart == 0
    kept = np.abs(terms) > np.float32(threshold)
    kept[:, :, restart_cols] = False
    terms[:, :, ~restart_cols] *= kept[:, :, ~restart_cols]
    terms[:, :, restart_cols] = patches[:, :, restart_cols]
    return terms, kept


def reference_diffconv(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    geometry: ConvGeometry = ConvGeometry(),
    threshold: float = 0.0,
    restart: int = DEFAULT_RESTART,
) -> tuple[np.ndarray, int, int]:
    """DiffConv as plain numpy (float64 sums): (Y [N, M, OH, OW], performed, dense)."""
    m, _, kh, kw = w.shape
    patches = window_patches(x.astype(np.float32), (kh, kw), geometry)
    terms, kept = window_differences(patches, threshold, restart)
    n, oh, ow, k = terms.shape
    contributions = terms.astype(np.float64) @ w.reshape(m, k).T.astype(np.float64)
    y = np.empty_like(contributions)
    for col in range(ow):
        if col % restart == 0:
            y[:, :, col] = contributions[:, :, col]
        else:
            y[:, :, col] = y[:, :, col - 1] + contributions[:, :, col]
    if bias is not None:
        y += bias.astype(np.float64)
    restart_windows = n * oh * len(range(0, ow, restart))
    performed = m * (restart_windows * k + int(kept.sum()))
    dense = n * m * oh * ow * k
    return y.transpose(0, 3, 1, 2).astype(np.float32), performed, dense


def threshold_for_ratio(
    patches: np.ndarray, ratio: float, restart: int = DEFAULT_RESTART
) -> tuple[float, float]:
    """Smallest threshold whose expected multiplications are at most ``ratio`` of dense, from
    the window patches of calibration inputs. Returns (threshold, kept fraction it gives)."""
    n, oh, ow, k = patches.shape
    windows = n * oh * ow
    restart_windows = n * oh * len(range(0, ow, restart))
    diffs = np.abs(patches[:, :, 1:] - patches[:, :, :-1]).astype(np.float32)
    diffs = diffs[:, :, (np.arange(1, ow) % restart) != 0].ravel()
    allowed = int(math.floor(ratio * windows * k)) - restart_windows * k
    if diffs.size == 0 or allowed >= np.count_nonzero(diffs):
        return 0.0, kept_fraction(patches, 0.0, restart)
    if allowed <= 0:  # even skipping every difference keeps the restart windows
        threshold = float(diffs.max())
    else:
        ordered = np.sort(diffs)
        threshold = float(ordered[diffs.size - allowed - 1])
    return threshold, kept_fraction(patches, threshold, restart)


def kept_fraction(patches: np.ndarray, threshold: float, restart: int = DEFAULT_RESTART) -> float:
    """performed / dense multiplications of DiffConv on these window patches."""
    n, oh, ow, k = patches.shape
    _, kept = window_differences(patches, threshold, restart)
    restart_windows = n * oh * len(range(0, ow, restart))
    return (restart_windows * k + int(kept.sum())) / (n * oh * ow * k)


# ---------------------------------------------------------------------------------------------
# MAC counter


@register_mac_counter(OP_TYPE, domain=OP_DOMAIN)
def _diffconv_macs(node, shapes, inits) -> int:
    """Dense Conv MACs scaled by the node's ``expected_kept`` attribute when it has one.

    ONNX shape inference does not know DiffConv, so the output size comes from the input's."""
    attributes = {a.name: a for a in node.attribute}
    w = shapes.get(node.input[1])
    if w is None or len(w) != 4:
        return 0
    out = shapes.get(node.output[0])
    x = shapes.get(node.input[0])
    if out is not None and len(out) == 4:
        out_hw = out[2:]
    elif x is not None and len(x) == 4:
        strides = list(attributes["strides"].ints) if "strides" in attributes else [1, 1]
        pads = list(attributes["pads"].ints) if "pads" in attributes else [0, 0, 0, 0]
        dilations = list(attributes["dilations"].ints) if "dilations" in attributes else [1, 1]
        out_hw = tuple(
            (x[2 + i] + pads[i] + pads[i + 2] - dilations[i] * (w[2 + i] - 1) - 1) // strides[i] + 1
            for i in range(2)
        )
    else:
        return 0
    dense = w[0] * out_hw[0] * out_hw[1] * math.prod(w[1:])
    if "expected_kept" in attributes:
        return int(round(dense * attributes["expected_kept"].f))
    return dense


# ---------------------------------------------------------------------------------------------
# Pass


class CalibrationSource(Protocol):
    """What the pass needs from calibration (passes/calibrate.py's ``Calibration``)."""

    inputs: np.ndarray

    def collect(self, model: ir.Model, value_names: list[str]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class DiffConvConfig(PassConfig):
    """``threshold``: skip differences with |d| <= threshold (0: exact). ``ratio``: instead,
    choose each layer's threshold from calibration data so that it keeps at most this fraction
    of the dense multiplications. Neither: threshold 0."""

    threshold: float | None = None
    ratio: float | None = None
    restart: int = DEFAULT_RESTART

    def __post_init__(self):
        if self.threshold is not None and self.ratio is not None:
            raise OptionError("diffconv: give --threshold or --ratio, not both")
        if self.threshold is not None and not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise OptionError(f"diffconv: threshold must be >= 0, got {self.threshold}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise OptionError(f"diffconv: ratio must be in (0, 1], got {self.ratio}")
        if self.restart < 1:
            raise OptionError(f"diffconv: restart must be >= 1, got {self.restart}")


@dataclass
class _Candidate:
    node: ir.Node
    weight: np.ndarray
    geometry: ConvGeometry


def _attribute(node: ir.Node, name: str, default: Any) -> Any:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def _eligibility(node: ir.Node) -> tuple[_Candidate | None, str | None]:
    """A candidate for replacement, or why the Conv stays as it is."""
    group = _attribute(node, "group", 1)
    if group != 1:
        return None, f"group={group}: DiffConv supports only group=1"
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None, "no weight input"
    weight = ir.convenience.get_const_tensor(node.inputs[1])
    if weight is None:
        return None, "weight is not a constant"
    weight_array = weight.numpy()
    if weight_array.ndim != 4:
        return None, f"not a 2-D convolution (weight rank {weight_array.ndim})"
    if weight_array.dtype != np.float32:
        return None, f"weight dtype {weight_array.dtype} (DiffConv is float32)"
    kernel = tuple(int(d) for d in weight_array.shape[2:])
    strides = tuple(int(v) for v in _attribute(node, "strides", (1, 1)))
    dilations = tuple(int(v) for v in _attribute(node, "dilations", (1, 1)))
    pads = tuple(int(v) for v in _attribute(node, "pads", (0, 0, 0, 0)))
    auto_pad = _attribute(node, "auto_pad", "NOTSET")
    if auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        shape = node.inputs[0].shape if node.inputs[0] is not None else None
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
            return None, f"auto_pad={auto_pad} with an unknown input size"
        pads_hw = []
        for size, k, s, d in zip(shape[2:], kernel, strides, dilations, strict=True):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            pads_hw.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        pads = (pads_hw[0][0], pads_hw[1][0], pads_hw[0][1], pads_hw[1][1])
    elif auto_pad != "NOTSET":
        return None, f"auto_pad={auto_pad} is not supported"
    input_shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if input_shape is not None and len(input_shape) != 4:
        return None, f"not a 2-D convolution (input rank {len(input_shape)})"
    return _Candidate(node, weight_array, ConvGeometry(strides, pads, dilations)), None


class ReplaceConvWithDiffConvPass(Pass):
    """Replace eligible Conv nodes by DiffConv (``--method diffconv [--threshold T]``)."""

    name = "diffconv"
    config_class = DiffConvConfig

    def __init__(self, config: DiffConvConfig | None = None, calibration: CalibrationSource | None = None):
        super().__init__(config)
        self.calibration = calibration

    def requires(self, model: ir.Model) -> None:
        if self.config.ratio is not None and self.calibration is None:
            raise OptionError("diffconv: --ratio needs calibration data (--data)")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        records: list[LayerRecord] = []
        candidates: list[_Candidate] = []
        for node in list(graph):
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                continue
            candidate, reason = _eligibility(node)
            name = node.name or f"Conv_{len(records)}"
            if candidate is None:
                records.append(LayerRecord(name=name, op="Conv", skipped=reason))
            else:
                candidates.append(candidate)

        activations: dict[str, np.ndarray] = {}
        if self.calibration is not None and candidates:
            names = [c.node.inputs[0].name for c in candidates]
            activations = self.calibration.collect(model, names)

        for candidate in candidates:
            records.append(self._replace(graph, candidate, activations.get(candidate.node.inputs[0].name)))

        modified = any(r.skipped is None for r in records)
        if modified:
            model.opset_imports[OP_DOMAIN] = OP_DOMAIN_VERSION
        kept = [r for r in records if r.skipped is None]
        stats = {
            "replaced": len(kept),
            "skipped": len(records) - len(kept),
            "macs_before": sum(r.macs_before for r in kept),
            "macs_after": sum(r.macs_after for r in kept),
        }
        return PassResult(model=model, modified=modified, layers=records, stats=stats)

    def _replace(self, graph: ir.Graph, candidate: _Candidate, activation: np.ndarray | None) -> LayerRecord:
        config: DiffConvConfig = self.config
        node, weight, geometry = candidate.node, candidate.weight, candidate.geometry
        m, c, kh, kw = weight.shape
        threshold = config.threshold if config.threshold is not None else 0.0
        expected_kept: float | None = None
        error: float | None = None
        out_hw: tuple[int, int] | None = None
        if activation is not None:
            x = np.asarray(activation, dtype=np.float32)[:CALIBRATION_SAMPLES]
            patches = window_patches(x, (kh, kw), geometry)
            out_hw = patches.shape[1:3]
            if config.ratio is not None:
                threshold, expected_kept = threshold_for_ratio(patches, config.ratio, config.restart)
            else:
                expected_kept = kept_fraction(patches, threshold, config.restart)
            exact, _, _ = reference_diffconv(x, weight, None, geometry, 0.0, config.restart)
            approx, _, _ = reference_diffconv(x, weight, None, geometry, threshold, config.restart)
            norm = float(np.linalg.norm(exact))
            error = float(np.linalg.norm(approx - exact)) / norm if norm > 0 else 0.0

        attributes = [
            ir.AttrInt64s("strides", list(geometry.strides)),
            ir.AttrInt64s("pads", list(geometry.pads)),
            ir.AttrInt64s("dilations", list(geometry.dilations)),
            ir.AttrInt64s("kernel_shape", [kh, kw]),
            ir.AttrFloat32("threshold", float(threshold)),
            ir.AttrInt64("restart", int(config.restart)),
        ]
        if expected_kept is not None:
            attributes.append(ir.AttrFloat32("expected_kept", float(expected_kept)))
        inputs = list(node.inputs[:3])
        new = ir.Node(OP_DOMAIN, OP_TYPE, inputs, attributes, num_outputs=1, name=node.name)
        old_out, new_out = node.outputs[0], new.outputs[0]
        new_out.shape, new_out.type = old_out.shape, old_out.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [old_out], [new_out])
        new_out.name = old_out.name

        shape = old_out.shape
        if out_hw is None and shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
            out_hw = (shape[2], shape[3])
        dense = m * c * kh * kw * out_hw[0] * out_hw[1] if out_hw else 0
        after = int(round(dense * expected_kept)) if expected_kept is not None else dense
        # Short enough for one cell of the layer table: "threshold 0.012, keeps 50%".
        detail = f"threshold {threshold:.3g}"
        if expected_kept is not None:
            detail += f", keeps {expected_kept:.0%}"
        if config.restart != DEFAULT_RESTART:
            detail += f", restart {config.restart}"
        params = int(weight.size) + (m if len(node.inputs) > 2 and node.inputs[2] is not None else 0)
        return LayerRecord(
            name=node.name or OP_TYPE,
            op="Conv",
            shape_before=tuple(weight.shape),
            shape_after=tuple(weight.shape),
            macs_before=dense,
            macs_after=after,
            params_before=params,
            params_after=params,
            error=error,
            error_basis="calibration" if error is not None else "",
            detail=detail,
        )

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == OP_TYPE and node.domain == OP_DOMAIN:
                if OP_DOMAIN not in model.opset_imports:
                    from compressor.errors import PassError

                    raise PassError(self.name, f"DiffConv nodes without an opset import for {OP_DOMAIN}")
                return
