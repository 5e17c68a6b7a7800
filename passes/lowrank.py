"""Linear layers as matrices, and their replacement by two-stage low-rank forms.

Conv, Gemm and MatMul with constant weights are all ``y = W x + b`` with W of shape
(outputs, fan-in). A low-rank pass approximates W by ``lift @ project`` (rank r) and this module
turns that back into ONNX: a first stage with ``project`` (a Conv keeping the original kernel,
or a Gemm/MatMul) followed by a second stage with ``lift`` (a 1 x 1 Conv, or Gemm/MatMul) that
also carries the bias. SVD (channel scheme) and sketching share it; spatial SVD adds its own
vertical/horizontal form in ``svd.py``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from scipy.linalg.blas import sgemm

from compressor.passes.base import LayerRecord
from compressor.passes.calibrate import (
    DEFAULT_BATCH_SIZE,
    Calibration,
    CrossMoments,
    Moments,
    StageClock,
    conv_output_positions,
    conv_patches,
    feature_rows,
    model_digest,
    sampled_rows,
)
from compressor.passes.graph import (
    ConvAttributes,
    NameScope,
    add_initializer,
    constant_array,
    conv_attributes,
    conv_node,
    replace_node,
)
from compressor.passes.linalg import map_per_core
from compressor.passes.walk import CalibrationWalk
from compressor.profile import profile_model, static_shapes

Shape = tuple[int, ...]


@dataclass
class LinearLayer:
    """One Conv/Gemm/MatMul node seen as ``y = W x + b``."""

    node: ir.Node
    kind: str  # "conv" | "gemm" | "matmul"
    weight: np.ndarray  # (outputs, fan_in) float64
    bias: np.ndarray | None  # (outputs,)
    original_weight_shape: Shape
    positions: int  # output positions per sample (H_out * W_out for conv, rows for matmul)
    input_shape: Shape
    output_shape: Shape
    conv: ConvAttributes | None = None

    def __post_init__(self):
        # kept: once the node is replaced its inputs are detached
        self.input_name: str = self.node.inputs[0].name

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def outputs(self) -> int:
        return self.weight.shape[0]

    @property
    def fan_in(self) -> int:
        return self.weight.shape[1]

    @property
    def dense_macs(self) -> int:
        return self.positions * self.outputs * self.fan_in

    @property
    def dense_params(self) -> int:
        return self.weight.size + (0 if self.bias is None else self.bias.size)

    def two_stage_macs(self, rank: int) -> int:
        return self.positions * rank * (self.fan_in + self.outputs)

    def two_stage_params(self, rank: int) -> int:
        return rank * (self.fan_in + self.outputs) + self.outputs

    def record(self, **kwargs) -> LayerRecord:
        base = dict(
            name=self.name,
            op=self.node.op_type,
            shape_before=self.original_weight_shape,
            macs_before=self.dense_macs,
            params_before=self.dense_params,
            macs_after=self.dense_macs,
            params_after=self.dense_params,
        )
        base.update(kwargs)
        return LayerRecord(**base)


def find_linear_layers(
    model: ir.Model, shapes: dict[str, Shape]
) -> tuple[list[LinearLayer], list[LayerRecord]]:
    """Every Conv/Gemm/MatMul of the main graph as a LinearLayer, or a record of why not."""
    layers: list[LinearLayer] = []
    skipped: list[LayerRecord] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        layer_or_reason = _as_linear_layer(node, shapes)
        if isinstance(layer_or_reason, str):
            skipped.append(
                LayerRecord(name=node.name or node.outputs[0].name, op=node.op_type,
                            skipped=layer_or_reason)
            )
        else:
            layers.append(layer_or_reason)
    return layers, skipped


def _as_linear_layer(node: ir.Node, shapes: dict[str, Shape]) -> LinearLayer | str:
    x = node.inputs[0]
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return "weight is not a constant"
    if weight.dtype != np.float32:
        return f"weight dtype {weight.dtype} (only float32 is supported)"
    in_shape = shapes.get(x.name) if x is not None else None
    out_shape = shapes.get(node.outputs[0].name)
    if in_shape is None or out_shape is None:
        return "input or output shape unknown (shape inference failed)"
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2])
        if bias is None:
            return "bias is not a constant"
    if node.op_type == "Conv":
        attrs = conv_attributes(node, weight.shape)
        if isinstance(attrs, str):
            return attrs
        if attrs.group != 1:
            depthwise = attrs.group == in_shape[1] and weight.shape[1] == 1
            kind = "depthwise" if depthwise else "grouped"
            return f"{kind} conv (group={attrs.group}): no cross-channel matrix to factorise"
        positions = math.prod(out_shape[2:])
        w2 = weight.reshape(weight.shape[0], -1).astype(np.float64)
        return LinearLayer(node, "conv", w2, None if bias is None else bias.astype(np.float64),
                           tuple(weight.shape), positions, in_shape, out_shape, attrs)
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA=1"
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        w2 = weight.T if not node.attributes.get_int("transB", 0) else weight
        w2 = alpha * w2.astype(np.float64)
        if bias is not None:
            if bias.size not in (1, w2.shape[0]):
                return f"Gemm bias of shape {bias.shape} is not per-output"
            bias = beta * np.broadcast_to(bias.astype(np.float64).reshape(-1), (w2.shape[0],))
        return LinearLayer(node, "gemm", np.ascontiguousarray(w2), bias, tuple(weight.shape),
                           in_shape[0], in_shape, out_shape)
    # MatMul: only x @ B with B constant 2-D
    if weight.ndim != 2:
        return f"MatMul weight of rank {weight.ndim} (only 2-D)"
    positions = math.prod(in_shape[:-1])
    return LinearLayer(node, "matmul", np.ascontiguousarray(weight.T.astype(np.float64)), None,
                       tuple(weight.shape), positions, in_shape, out_shape)


class ReferenceRows:
    """Each layer's rows at its sampled positions in the model as surveyed, kept for the
    sequential refits, which pair them with the compressed model's rows at the same positions.

    A refit reads the reference side only through the layer's output y = W x, so a layer
    with fewer outputs than fan-in keeps y (a 3 x 3 conv: a ninth of its patch), any other
    its input rows x. One float32 file per layer, sample-major, in a temporary folder that
    ``close`` removes (use as a context manager): ResNet-50's at 200 samples take 1.2 GB,
    in the page cache, not the process. Without them the refit ran
    the original model a second time, segment by segment, storing its frontier."""

    def __init__(self):
        self._folder: Path | None = None
        # layer name -> file, row width, rows per sample, whether the rows are outputs
        self._layers: dict[str, tuple[Path | None, int, int, bool]] = {}
        self._weights: dict[str, np.ndarray] = {}  # W in float32, while rows are added
        self._samples: dict[str, int] = {}
        self._lock = threading.Lock()  # the survey adds layers from several threads

    def __enter__(self) -> ReferenceRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        entry = self._layers.get(name)
        return entry is not None and entry[0] is not None

    def outputs(self, name: str) -> bool:
        """Whether the layer's rows are its outputs y = W x (else its inputs x)."""
        return self._layers[name][3]

    def add(self, layer: LinearLayer, first_sample: int, rows: np.ndarray,
            samples: int) -> None:
        """The rows of ``samples`` samples from ``first_sample`` on (each sample's rows
        together, as ``batch_rows`` draws them), appended: samples come in order."""
        name = layer.name
        with self._lock:
            if name not in self._layers:
                if self._folder is None:
                    self._folder = Path(tempfile.mkdtemp(prefix="compressor-rows-"))
                keep_outputs = layer.outputs < layer.fan_in
                if keep_outputs:
                    self._weights[name] = np.asfortranarray(layer.weight, dtype=np.float32)
                width = layer.outputs if keep_outputs else layer.fan_in
                path = self._folder / f"{len(self._layers)}.f32"
                path.touch()
                self._layers[name] = (path, width, rows.shape[0] // max(samples, 1),
                                      keep_outputs)
                self._samples[name] = 0
        path, width, per_sample, keep_outputs = self._layers[name]
        if path is None:  # discarded
            return
        if first_sample != self._samples[name] or rows.shape[0] != per_sample * samples:
            raise ValueError(f"reference rows of '{name}' must come in sample order, "
                             f"{per_sample} a sample")
        data = np.ascontiguousarray(rows, dtype=np.float32)
        if keep_outputs:
            # W rows^T on the rows' Fortran view, by SciPy's BLAS like the survey's Gram
            # matrices (numpy's OpenBLAS beside it, each library's threads spinning, tripled
            # the survey's statistics on ResNet-50); its transpose is y, C-ordered
            data = sgemm(1.0, self._weights[name], data.T).T
        with open(path, "ab") as f:
            f.write(np.ascontiguousarray(data).data)
        self._samples[name] += samples

    def discard(self, name: str) -> None:
        """Keep no rows of this layer (its refit walks the original model instead), now and
        whatever is added later."""
        with self._lock:
            entry = self._layers.get(name)
            if entry is not None and entry[0] is not None:
                entry[0].unlink(missing_ok=True)
            self._layers[name] = (None, 0, 0, False)

    def sealed(self) -> ReferenceRows:
        """Done adding: the weights' float32 copies go."""
        self._weights.clear()
        return self

    def read(self, name: str, first_sample: int, stop_sample: int) -> np.ndarray:
        """The rows of samples ``first_sample`` to ``stop_sample`` (excluded)."""
        path, width, per_sample, _ = self._layers[name]
        if stop_sample > self._samples[name]:
            raise ValueError(f"reference rows of '{name}' hold {self._samples[name]} samples, "
                             f"not {stop_sample}")
        count = (stop_sample - first_sample) * per_sample * width
        with open(path, "rb") as f:
            f.seek(first_sample * per_sample * width * 4)
            data = np.fromfile(f, np.float32, count)
        return data.reshape(-1, width)

    def close(self) -> None:
        self._layers.clear()
        self._weights.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


@dataclass
class Survey:
    """A model's linear layers and what low-rank passes need to know about them."""

    proto: onnx.ModelProto  # the model as it was before the pass (for paired calibration)
    total_macs: int
    layers: list[LinearLayer]
    skipped: list[LayerRecord]
    moments: dict[str, Moments]  # input statistics by layer name; empty without calibration
    reference_rows: ReferenceRows | None = None  # with keep_reference_rows: close it after


def survey(
    model: ir.Model,
    calibration: Calibration | None,
    max_rows_per_batch: int = 20000,
    seed: int = 0,
    clock: StageClock | None = None,
    keep_reference_rows: bool = False,
) -> Survey:
    """Shapes, MACs, the factorisable layers (and why others are not), and, with calibration
    data, every layer's input statistics in one run (and, with ``keep_reference_rows``, each
    layer's sampled rows for the refits: ``ReferenceRows``)."""
    proto = ir.serde.serialize_model(model)
    shapes, _ = static_shapes(proto)
    total_macs = profile_model(proto).macs
    layers, skipped = find_linear_layers(model, shapes)
    rows = ReferenceRows() if calibration is not None and keep_reference_rows else None
    # the survey runs nearly the whole model: its first output, remembered, spares the
    # pipeline's verification a run of the original
    try:
        moments = ({} if calibration is None
                   else gather_moments(calibration, model, layers, max_rows_per_batch, seed,
                                       clock, remember_as=model_digest(proto),
                                       reference_rows=rows))
    except BaseException:
        if rows is not None:
            rows.close()
        raise
    return Survey(proto, total_macs, layers, skipped, moments,
                  None if rows is None else rows.sealed())


def rows_per_sample(max_rows_per_batch: int) -> int:
    """Rows drawn from each sample: ``max_rows_per_batch`` spread over a batch of the default
    size. Per sample, not per batch, so the statistics do not depend on how the calibration
    set is batched."""
    return max(1, math.ceil(max_rows_per_batch / DEFAULT_BATCH_SIZE))


def layer_rows(
    layer: LinearLayer,
    x: np.ndarray,
    max_rows: int | None = None,
    rng: np.random.Generator | None = None,
    index: np.ndarray | None = None,
) -> np.ndarray:
    """The input vectors the layer's W multiplies (im2col patches for a Conv): all of them,
    at most ``max_rows`` drawn at random, or the rows ``index`` names (``batch_rows``)."""
    if layer.kind == "conv":
        assert layer.conv is not None
        return conv_patches(x, layer.conv, max_rows, rng, index)
    rows = feature_rows(x)
    if index is not None:
        return rows[index]
    if max_rows is not None and rows.shape[0] > max_rows:
        rng = rng or np.random.default_rng(0)
        rows = rows[rng.choice(rows.shape[0], max_rows, replace=False)]
    return rows


def batch_rows(layer: LinearLayer, x: np.ndarray, first_sample: int, per_sample: int,
               seed: int, conv: ConvAttributes | None = None) -> np.ndarray:
    """Which rows of the layer's input vectors of a batch to use: ``per_sample`` positions of
    each sample, drawn per sample (``sampled_rows``); ``conv``: see ``_positions``."""
    return sampled_rows(first_sample, x.shape[0], _positions(layer, x.shape, conv),
                        per_sample, seed)


def _positions(layer: LinearLayer, shape: Sequence[int],
               conv: ConvAttributes | None = None) -> int:
    """Output positions per sample of the layer reading a tensor of ``shape`` (through
    ``conv``'s window instead of its own: the hidden tensor of a factorised layer, which has
    the layer's output positions)."""
    conv = conv or layer.conv
    if conv is not None:
        return conv_output_positions(shape, conv)
    return math.prod(shape[1:-1])


def gather_moments(
    calibration: Calibration,
    model: ir.Model,
    layers: Sequence[LinearLayer],
    max_rows_per_batch: int = 20000,
    seed: int = 0,
    clock: StageClock | None = None,
    remember_as: str | None = None,
    reference_rows: ReferenceRows | None = None,
) -> dict[str, Moments]:
    """Mean and second moment of each layer's input vectors over the calibration set.

    Streamed: one batch of the layers' inputs at a time. Convolution inputs give positions x
    samples patch rows; to bound the cost, a seeded random subset of positions of each
    sample is used (``rows_per_sample``), the same whatever the batch size. ``remember_as``:
    see ``Calibration.stream``; ``reference_rows`` keeps every layer's rows too.
    """
    per_sample = rows_per_sample(max_rows_per_batch)
    moments = {layer.name: Moments.zeros(layer.fan_in) for layer in layers}
    by_input: dict[str, list[LinearLayer]] = {}
    for layer in layers:
        by_input.setdefault(layer.input_name, []).append(layer)

    def consume(batch: dict[str, np.ndarray], start: int, stop: int) -> None:
        def add(layer: LinearLayer) -> None:
            x = batch[layer.input_name]
            rows = layer_rows(layer, x, index=batch_rows(layer, x, start, per_sample, seed))
            moments[layer.name].add(rows)
            if reference_rows is None:
                return
            if len(x) == stop - start:  # samples on the first axis, as a refit pairs them
                reference_rows.add(layer, start, rows, stop - start)
            else:  # a (sequence, batch, features) activation: no pairing by sample
                reference_rows.discard(layer.name)

        # one layer's patches per core, the Gram matrices on BLAS's threads (see
        # map_per_core: SciPy's BLAS serialises calls from several threads)
        map_per_core(add, layers, one_blas_thread=False)

    if by_input:
        calibration.stream(model, list(by_input), consume, label="input statistics",
                           clock=clock, stage="survey", remember_as=remember_as,
                           with_range=True)
    return moments


def gather_cross_moments(
    walk: CalibrationWalk,
    current: ir.Model,
    layer: LinearLayer,
    max_rows_per_batch: int = 20000,
    seed: int = 0,
    current_value: str | None = None,
    current_conv: ConvAttributes | None = None,
    label: str | None = None,
    reference_rows: ReferenceRows | None = None,
) -> CrossMoments:
    """Paired statistics at the same output positions of the same inputs: the layer's input
    rows in the walk's reference (original) model, and in the current (partly compressed) one
    either the same tensor or ``current_value`` read with ``current_conv``'s window (e.g. the
    hidden tensor of a factorised layer, to refit its second stage). Streamed batch by batch;
    each model runs only from where the walk stands to the tensor asked for.

    A refit reads the reference side only through the layer's output y = W x: where that is
    cheaper (outputs x (fan-in + current width) < fan-in x current width, as for every 3 x 3
    conv that does not widen), the moments accumulate y (``CrossMoments.project``); read them
    with ``output_statistics(layer.weight)`` either way.

    With ``reference_rows`` holding the layer (the survey's), the reference side is read from
    there and only the current model walks."""
    name = layer.input_name
    now_name = current_value or name
    dim_hat = layer.fan_in if current_value is None else _window_size(current_conv, current,
                                                                       now_name)
    stored = reference_rows is not None and layer.name in reference_rows
    if stored and reference_rows.outputs(layer.name):
        moments = CrossMoments.zeros(layer.outputs, dim_hat, outputs=True)
    else:
        project = None
        if layer.outputs * (layer.fan_in + dim_hat) < layer.fan_in * dim_hat:
            project = layer.weight
        moments = CrossMoments.zeros(layer.fan_in, dim_hat, project=project)
    per_sample = rows_per_sample(max_rows_per_batch)
    seen = [0]

    def consume(ref: dict[str, np.ndarray], now: dict[str, np.ndarray]) -> None:
        x_hat = now[now_name]
        first = seen[0]
        seen[0] += len(x_hat)
        if stored:
            assert reference_rows is not None
            rows = reference_rows.read(layer.name, first, seen[0])
            # the layer's output positions, as the survey drew them from its input
            index = batch_rows(layer, x_hat, first, per_sample, seed, current_conv)
        else:
            index = batch_rows(layer, ref[name], first, per_sample, seed)
            rows = layer_rows(layer, ref[name], index=index)
        if current_conv is not None:
            rows_hat = conv_patches(x_hat, current_conv, index=index)
        else:
            rows_hat = layer_rows(layer, x_hat, index=index)
        moments.add(rows, rows_hat)

    walk.stream(current, [] if stored else [name], [now_name], consume,
                label=label or f"refit {layer.name}")
    return moments


def _window_size(conv: ConvAttributes | None, model: ir.Model, value_name: str) -> int:
    """Features per row of a conv window over ``value_name`` (channels x kernel area)."""
    assert conv is not None, "a current_value needs the conv window that reads it"
    for node in model.graph:
        for out in node.outputs:
            if out.name == value_name:
                weight = constant_array(node.inputs[1])
                return int(weight.shape[0]) * conv.kernel[0] * conv.kernel[1]
    raise KeyError(value_name)


def mean_correction(layer: LinearLayer, approx_weight: np.ndarray, mean: np.ndarray | None):
    """Bias of the approximation: b + (W - W') mu keeps the output mean exact on the data."""
    bias = np.zeros(layer.outputs) if layer.bias is None else layer.bias.copy()
    if mean is not None:
        bias += (layer.weight - approx_weight) @ mean
    if layer.bias is None and mean is None:
        return None
    return bias


def replace_with_two_stage(
    model: ir.Model,
    layer: LinearLayer,
    project: np.ndarray,
    lift: np.ndarray,
    bias: np.ndarray | None,
    names: NameScope,
    tag: str,
) -> None:
    """Replace the layer's node by ``lift @ (project @ x) + bias``.

    project: (r, fan_in); lift: (outputs, r). For a Conv the first stage keeps the kernel,
    strides, pads and dilations; the second is a 1 x 1 Conv.
    """
    graph = model.graph
    rank = project.shape[0]
    x = layer.node.inputs[0]
    base = names(f"{layer.name}_{tag}")
    if layer.kind == "conv":
        assert layer.conv is not None
        kh, kw = layer.conv.kernel
        w1 = add_initializer(graph, names(base + "_project"),
                             project.reshape(rank, -1, kh, kw))
        first = conv_node(x, w1, None, layer.conv, names(base + "_project"))
        w2 = add_initializer(graph, names(base + "_lift"), lift.reshape(layer.outputs, rank, 1, 1))
        b2 = None if bias is None else add_initializer(graph, names(base + "_bias"), bias)
        one = ConvAttributes((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1)
        second = conv_node(first.outputs[0], w2, b2, one, names(base + "_lift"))
    elif layer.kind == "gemm":
        w1 = add_initializer(graph, names(base + "_project"), project)
        first = ir.node("Gemm", [x, w1], {"transB": 1}, name=names(base + "_project"))
        w2 = add_initializer(graph, names(base + "_lift"), lift)
        inputs = [first.outputs[0], w2]
        if bias is not None:
            inputs.append(add_initializer(graph, names(base + "_bias"), bias))
        second = ir.node("Gemm", inputs, {"transB": 1}, name=names(base + "_lift"))
    else:
        w1 = add_initializer(graph, names(base + "_project"), project.T)
        first = ir.node("MatMul", [x, w1], name=names(base + "_project"))
        w2 = add_initializer(graph, names(base + "_lift"), lift.T)
        second = ir.node("MatMul", [first.outputs[0], w2], name=names(base + "_lift"))
        first.outputs[0].name = names(base + "_hidden")
        if bias is not None and np.any(bias):
            second.outputs[0].name = names(base + "_unbiased")
            b = add_initializer(graph, names(base + "_bias"), bias)
            third = ir.node("Add", [second.outputs[0], b], name=names(base + "_bias"))
            replace_node(graph, layer.node, [first, second, third])
            return
    # Name the new intermediate value now: left unnamed, the serializer would invent a
    # "val_N" name that can collide with the exporter's own.
    first.outputs[0].name = names(base + "_hidden")
    replace_node(graph, layer.node, [first, second])


def relative_error(sq_error: float, energy: float) -> float:
    return float(math.sqrt(max(sq_error, 0.0) / energy)) if energy > 0 else 0.0
