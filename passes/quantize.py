"""Int8 quantization with onnxruntime's own tooling: static QDQ, per-channel int8 weights.

``QuantizeInt8Pass`` is the last stage of a compression run. It does not quantize anything by
hand: onnxruntime's calibrator measures the activation ranges on the calibration data and
``onnxruntime.quantization.quantize_static`` writes the QDQ model (QuantizeLinear /
DequantizeLinear pairs around each quantized node), which onnxruntime's CPU provider fuses into
int8 kernels (QLinearConv, QGemm, QLinearMatMul, ...). What this pass adds is the choice, node by
node, of what to quantize:

* a node whose int8 form is measured slower than its fp32 form (at the latency table's batch)
  stays fp32: int8 is no free lunch on CPUs (a 1-channel 5 x 5 conv ran 6x slower in int8);
* a node whose own int8 output error on the calibration data exceeds ``max_error`` stays fp32;
* nodes of our custom ops (domain ``ai.compressor``) and ops without an int8 kernel stay fp32.

Every decision is a ``LayerRecord`` saying why. ``int8_nodes`` reads a QDQ model back and names
the nodes that compute in int8, for ``compressor evaluate`` and ``compressor inspect``.
"""

from __future__ import annotations

import copy
import logging
import platform
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime
from compressor.errors import CompressionError, DataError, OptionError, PassError
from compressor.passes.base import LayerRecord, Pass, PassConfig, PassResult
from compressor.passes.graph import NameScope
from compressor.profile import profile_model

if TYPE_CHECKING:
    from compressor.latency import LatencyContext

MAX_IR_VERSION = 10  # what the onnxruntime here reads (the pipeline caps its output the same)

# Ops that onnxruntime's CPU provider runs with an int8 kernel once DequantizeLinear feeds their
# inputs (and QuantizeLinear takes their output), checked on onnxruntime 1.32's fused graphs.
# These are the nodes chosen one by one (error, time).
INT8_KERNELS = {
    "Conv": "QLinearConv",
    "Gemm": "QGemm",
    "MatMul": "QLinearMatMul",
    "Add": "QLinearAdd",
    "Mul": "QLinearMul",
    "Concat": "QLinearConcat",
    "AveragePool": "QLinearAveragePool",
    "GlobalAveragePool": "QLinearGlobalAveragePool",
    "Sigmoid": "QLinearSigmoid",
    "LeakyRelu": "QLinearLeakyRelu",
    "Softmax": "QLinearSoftmax",
}
# Gemm and MatMul fuse with a float output too (QGemm, MatMulIntegerToFloat); the others only
# when a QuantizeLinear takes their output.
FLOAT_OUTPUT_OK = frozenset({"Gemm", "MatMul"})
# Ops that move int8 values as they are (onnxruntime drops the QDQ pair around them). The
# quantizer quantizes them only when their input is already quantized, so they follow the
# decisions above.
INT8_PASS_THROUGH = frozenset(
    {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Slice"}
)
# The pass-through ops onnxruntime's QDQPropagationTransformer moves a QuantizeLinear up (and
# a DequantizeLinear down) through: they run in int8 with only one side quantized.
QDQ_PROPAGATES = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"})
# A Relu or Clip after a quantized node is folded into that node's uint8 output range.
REMOVABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
OPS_TO_QUANTIZE = tuple(sorted(set(INT8_KERNELS) | INT8_PASS_THROUGH | REMOVABLE_ACTIVATIONS))
# Ops with weights that have no int8 kernel on CPU (the quantizer would wrap them in Q/DQ pairs
# that only add work: measured for ConvTranspose).
NO_INT8_KERNEL = frozenset({"ConvTranspose", "LSTM", "GRU", "RNN", "Attention"})

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("auto", "uint8", "int8")
# 8-bit quantization of a well-spread tensor costs ~0.3-1 % relative error per layer (per-channel
# weights, min-max ranges: 0.4-2 % on the zoo's convs and gemms); 5 % means a few outliers
# stretch the range so far that most values share a handful of levels.
DEFAULT_MAX_ERROR = 0.05

_DEFAULT_DOMAINS = ("", "ai.onnx")


class LatencySource(Protocol):
    """What the pass needs from ``compressor.latency.LatencyTable``: its context (the batch),
    the cached median ms of a candidate, and whole models timed side by side."""

    context: LatencyContext

    def time(self, proto: onnx.ModelProto, signature: str | None = None) -> float: ...

    def compare(self, models: Mapping[str, onnx.ModelProto],
                feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, float]: ...


class CalibrationSource(Protocol):
    """What the pass needs from ``passes/calibrate.py``'s ``Calibration``."""

    inputs: np.ndarray
    batch_size: int


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """max_error: a node whose own int8 output error (||y_int8 - y|| / ||y|| on the calibration
    data, its inputs exact) exceeds this stays fp32. min_speedup: with a latency table, a node
    stays int8 only if fp32 time / int8 time >= this. calibration: onnxruntime's range
    estimator ('minmax', 'entropy', 'percentile'). activations: 'auto' is what onnxruntime
    recommends for this CPU (uint8 on x86, int8 symmetric elsewhere). reduce_range: 7-bit
    weights; None: on x86 without VNNI only (where onnxruntime's u8s8 kernels can saturate).
    exclude: node names kept fp32 whatever they measure."""

    max_error: float = DEFAULT_MAX_ERROR
    min_speedup: float = 1.0
    calibration: str = "minmax"
    activations: str = "auto"
    reduce_range: bool | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.max_error > 0:
            raise OptionError(f"quantize: max_error must be > 0, got {self.max_error}")
        if not self.min_speedup > 0:
            raise OptionError(f"quantize: min_speedup must be > 0, got {self.min_speedup}")
        if self.calibration not in CALIBRATION_METHODS:
            raise OptionError(f"quantize: calibration must be one of {', '.join(CALIBRATION_METHODS)}, "
                              f"got '{self.calibration}'")
        if self.activations not in ACTIVATION_TYPES:
            raise OptionError(f"quantize: activations must be one of {', '.join(ACTIVATION_TYPES)}, "
                              f"got '{self.activations}'")


# ---------------------------------------------------------------------------------------------
# Reading a QDQ model


def _index(graph: onnx.GraphProto):
    producers = {out: node for node in graph.node for out in node.output if out}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                consumers[name].append(node)
    return producers, consumers


def _is_constant(name: str, initializers: set[str], producers: dict) -> bool:
    node = producers.get(name)
    return name in initializers or (node is not None and node.op_type == "Constant")


def _float_inputs(node: onnx.NodeProto, types: dict[str, int]) -> list[str]:
    """The inputs that carry float values (not shapes, indices or scales)."""
    if node.op_type in ("Conv", "Gemm", "MatMul"):
        return [name for name in node.input if name]
    if node.op_type in ("Reshape", "Resize", "Squeeze", "Unsqueeze", "Clip"):
        return [node.input[0]]
    return [name for name in node.input if name and types.get(name, TensorProto.FLOAT)
            in (TensorProto.FLOAT, TensorProto.FLOAT16)]


def int8_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes of a QDQ model that onnxruntime's CPU provider runs in int8.

    A node computes in int8 when every float input comes from a DequantizeLinear, at least one
    of them dequantizes an activation (not a constant weight), and -- except for Gemm and
    MatMul, which fuse with a float output too -- QuantizeLinear takes its output. Only ops with
    an int8 kernel (``INT8_KERNELS``) or that move int8 values as they are
    (``INT8_PASS_THROUGH``) count. onnxruntime also moves QuantizeLinear up and
    DequantizeLinear down through some of the latter (``QDQ_PROPAGATES``), which then run in
    int8 with a quantized output or input alone. Nodes without a name are named
    ``op_type:index``.
    """
    graph = proto.graph
    producers, consumers = _index(graph)
    initializers = {init.name for init in graph.initializer}
    graph_outputs = {out.name for out in graph.output}
    types = {init.name: init.data_type for init in graph.initializer}
    for value in list(graph.input) + list(graph.value_info):
        types[value.name] = value.type.tensor_type.elem_type

    def dequantized_activation(name: str) -> bool:
        dq = producers.get(name)
        return (dq is not None and dq.op_type == "DequantizeLinear"
                and not _is_constant(dq.input[0], initializers, producers))

    def only_quantized(out: str, int8: set[int]) -> bool:
        users = consumers.get(out, [])
        return out not in graph_outputs and bool(users) and all(
            u.op_type == "QuantizeLinear" or id(u) in int8 for u in users)

    found: set[int] = set()
    for node in graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        if node.op_type not in INT8_KERNELS and node.op_type not in INT8_PASS_THROUGH:
            continue
        inputs = _float_inputs(node, types)
        dequantized = [producers.get(name) for name in inputs]
        if not inputs or any(p is None or p.op_type != "DequantizeLinear" for p in dequantized):
            continue
        if all(_is_constant(p.input[0], initializers, producers) for p in dequantized):
            continue  # only weights are dequantized: the activation is float
        if node.op_type in FLOAT_OUTPUT_OK or only_quantized(node.output[0], set()):
            found.add(id(node))

    def propagates(node: onnx.NodeProto) -> bool:
        return (node.domain in _DEFAULT_DOMAINS and node.op_type in QDQ_PROPAGATES
                and id(node) not in found)

    for node in graph.node:  # DequantizeLinear moved down
        source = node.input[0] if node.input else ""
        upstream = producers.get(source)
        if propagates(node) and len(consumers.get(source, [])) == 1 and (
                dequantized_activation(source) or (upstream is not None and id(upstream) in found
                                                   and upstream.op_type in QDQ_PROPAGATES)):
            found.add(id(node))
    for node in reversed(graph.node):  # QuantizeLinear moved up
        if propagates(node) and only_quantized(node.output[0], found):
            found.add(id(node))
    return [node.name or f"{node.op_type}:{i}" for i, node in enumerate(graph.node)
            if id(node) in found]


@dataclass
class _Island:
    """A node of the QDQ model with the Q/DQ nodes around it: for an int8 node, what
    onnxruntime fuses into one kernel; for an fp32 node, the dequantized inputs it reads."""

    node: onnx.NodeProto
    dequantize: list[onnx.NodeProto]  # DequantizeLinear of its dequantized inputs
    quantize: list[tuple[onnx.NodeProto, str]]  # QuantizeLinear of an input activation, and
    #                                           the fp32 model's tensor it quantizes
    float_inputs: dict[str, str]  # inputs read as they are: name -> the fp32 model's tensor
    output_quantize: onnx.NodeProto | None  # QuantizeLinear of the output (None: float out)
    output_dequantize: onnx.NodeProto | None
    reference: str  # the fp32 model's tensor that the island's output stands for

    @property
    def output(self) -> str:
        """The island's (quantized, or float) output in the QDQ model."""
        return self.output_quantize.output[0] if self.output_quantize else self.node.output[0]


def _island(qdq: onnx.ModelProto, index, node: onnx.NodeProto, fp32_tensors: set[str],
            with_output: bool = True) -> _Island | None:
    """The island of ``node``, or None where a tensor cannot be traced to the fp32 model.
    ``with_output``: take in the QuantizeLinear of its output (an int8 node's own)."""
    producers, consumers = index
    initializers = {init.name for init in qdq.graph.initializer}
    dequantize, quantize, float_inputs = [], [], {}
    for name in (n for n in node.input if n):
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            source = name if _is_constant(name, initializers, producers) else _fp32_name(
                name, index, fp32_tensors)
            if source is None:
                return None
            float_inputs[name] = source
            continue
        dequantize.append(dq)
        if _is_constant(dq.input[0], initializers, producers):
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return None
        source = _fp32_name(q.input[0], index, fp32_tensors)
        if source is None:
            return None
        quantize.append((q, source))
    out = node.output[0]
    users = consumers.get(out, []) if with_output else []
    output_q = users[0] if len(users) == 1 and users[0].op_type == "QuantizeLinear" else None
    output_dq = None
    if output_q is not None:
        after = consumers.get(output_q.output[0], [])
        output_dq = next((u for u in after if u.op_type == "DequantizeLinear"), None)
    reference = _fp32_name(out, index, fp32_tensors)
    if reference is None:
        return None
    return _Island(node, dequantize, quantize, float_inputs, output_q, output_dq, reference)


def _fp32_name(name: str, index, fp32_tensors: set[str]) -> str | None:
    """The fp32 model's tensor that ``name`` of the QDQ model holds (the quantizer renames a
    graph output's producer ``x`` to ``x_QuantizeLinear_Input``: follow its Q/DQ pair)."""
    if name in fp32_tensors:
        return name
    _, consumers = index
    for q in consumers.get(name, []):
        if q.op_type == "QuantizeLinear":
            for dq in consumers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear" and dq.output[0] in fp32_tensors:
                    return dq.output[0]
    return None


def _float_graph_outputs(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the QuantizeLinear/DequantizeLinear pair the quantizer puts on a graph output that
    an int8 Gemm or MatMul writes: those kernels write float as well (QGemm,
    MatMulIntegerToFloat), and a quantized output would clip whatever exceeds the range seen in
    calibration (logits above it, say) and round the rest to 256 levels, for no time saved."""
    graph = qdq.graph
    producers, consumers = _index(graph)
    outputs = {out.name for out in graph.output}
    drop: list[onnx.NodeProto] = []
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.output[0] not in outputs:
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(consumers[q.output[0]]) != 1:
            continue
        node = producers.get(q.input[0])
        if (node is None or node.op_type not in FLOAT_OUTPUT_OK or node.domain not in _DEFAULT_DOMAINS
                or len(consumers[q.input[0]]) != 1 or q.input[0] in outputs):
            continue
        node.output[:] = [dq.output[0] if n == q.input[0] else n for n in node.output]
        drop += [q, dq]
    if drop:
        kept = [n for n in graph.node if all(n is not d for d in drop)]
        del graph.node[:]
        graph.node.extend(kept)
        used = {name for n in graph.node for name in n.input}
        inits = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(inits)
        names = {n for node in graph.node for n in node.output}
        kept_info = [v for v in graph.value_info if v.name in names or v.name in used]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
    return qdq


# ---------------------------------------------------------------------------------------------
# Standalone models: the error probe and the timing candidates


def _copy_initializers(source: onnx.ModelProto, names, rename=lambda n: n) -> list[TensorProto]:
    by_name = {init.name: init for init in source.graph.initializer}
    copies = []
    for name in dict.fromkeys(names):
        if name in by_name:
            tensor = TensorProto()
            tensor.CopyFrom(by_name[name])
            tensor.name = rename(name)
            copies.append(tensor)
    return copies


def _renamed(node: onnx.NodeProto, rename) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [rename(n) if n else n for n in node.input]
    copy.output[:] = [rename(n) if n else n for n in node.output]
    copy.name = rename(node.name)
    return copy


def _probe_model(fp32: onnx.ModelProto, qdq: onnx.ModelProto, islands: list[_Island]
                 ) -> tuple[onnx.ModelProto, list[tuple[str, str, str]]]:
    """The fp32 model plus, for each island, a copy of it fed with the fp32 model's own
    tensors: (model, [(node name, fp32 output, island output)]). Comparing the two outputs
    gives each node's error with its inputs exact (errors from nodes upstream excluded)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    del probe.opset_import[:]
    probe.opset_import.extend(qdq.opset_import)
    for domain in fp32.opset_import:
        if all(domain.domain != o.domain for o in qdq.opset_import):
            probe.opset_import.append(domain)
    fp32_initializers = {init.name for init in fp32.graph.initializer}
    pairs = []
    for i, island in enumerate(islands):
        prefix = f"__int8_probe{i}__/"
        mapping = {name: source for name, source in island.float_inputs.items()
                   if source != name or name in fp32_initializers or not any(
                       name == init.name for init in qdq.graph.initializer)}

        def rename(name, prefix=prefix, mapping=mapping):
            return mapping.get(name, prefix + name)

        nodes: list[onnx.NodeProto] = []
        constants: list[str] = []
        for q, source in island.quantize:
            copy = _renamed(q, rename)
            copy.input[0] = source
            nodes.append(copy)
            constants += list(q.input[1:])
        for dq in island.dequantize:
            nodes.append(_renamed(dq, rename))
            constants += [n for n in dq.input if n]
        nodes.append(_renamed(island.node, rename))
        constants += [n for n in island.node.input if n and n not in mapping]
        output = rename(island.node.output[0])
        for extra in (island.output_quantize, island.output_dequantize):
            if extra is not None:
                nodes.append(_renamed(extra, rename))
                constants += list(extra.input[1:])
                output = rename(extra.output[0])
        probe.graph.node.extend(nodes)
        probe.graph.initializer.extend(_copy_initializers(qdq, constants, rename))
        pairs.append((island.node.name, island.reference, output))
    present = {o.name for o in probe.graph.output}
    for _, reference, output in pairs:
        for name in (reference, output):
            if name not in present:
                probe.graph.output.append(helper.make_empty_tensor_value_info(name))
                present.add(name)
    return probe, pairs


def _initializer_arrays(source: onnx.ModelProto, nodes: list[onnx.NodeProto]
                       ) -> dict[str, np.ndarray]:
    used = {n for node in nodes for n in node.input if n}
    return {init.name: numpy_helper.to_array(init) for init in source.graph.initializer
            if init.name in used}


def _observe(proto: onnx.ModelProto, feed: Mapping[str, np.ndarray]
             ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every tensor of ``proto`` when run on ``feed`` (what shape inference
    cannot tell past a custom op, measured instead)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    names = [o.name for o in probe.graph.output]
    for node in probe.graph.node:
        for out in node.output:
            if out and out not in present:
                probe.graph.output.append(helper.make_empty_tensor_value_info(out))
                present.add(out)
                names.append(out)
    values = runtime.session(probe).run(names, dict(feed))
    observed = {name: (tuple(v.shape), v.dtype) for name, v in zip(names, values, strict=True)}
    observed.update({name: (tuple(v.shape), v.dtype) for name, v in feed.items()})
    return observed


def _with_types(proto: onnx.ModelProto, observed) -> onnx.ModelProto:
    """``proto`` with a value_info (element type) for every tensor that has none, so that
    onnxruntime's calibrator, which picks the float tensors by their value_info, sees them."""
    typed = {v.name for v in list(proto.graph.value_info) + list(proto.graph.input)
             + list(proto.graph.output)}
    typed |= {init.name for init in proto.graph.initializer}
    for name, (_, dtype) in observed.items():
        if name not in typed:
            proto.graph.value_info.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(dtype), None))
    return proto


def _rows(feed: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The feed with ``batch`` rows (repeated or cut)."""
    return {name: np.resize(array, (batch, *array.shape[1:])).astype(array.dtype, copy=False)
            for name, array in feed.items()}


def _zero_point_type(qdq: onnx.ModelProto, q: onnx.NodeProto) -> np.dtype:
    """The integer type a QuantizeLinear writes (its zero point's; uint8 without one)."""
    for init in qdq.graph.initializer:
        if len(q.input) > 2 and init.name == q.input[2]:
            return helper.tensor_dtype_to_np_dtype(init.data_type)
    return np.dtype(np.uint8)


def _candidates(fp32: onnx.ModelProto, qdq: onnx.ModelProto, island: _Island,
                shapes: dict[str, tuple[int, ...]]
                ) -> tuple[onnx.ModelProto, onnx.ModelProto] | str:
    """(fp32 form, int8 form) of one island as standalone models at the shapes given, or why
    they cannot be built. The fp32 form is the node and the activation folded into its int8
    output; the int8 form takes and gives int8 tensors, as inside a run of int8 nodes."""
    from compressor.latency import candidate_model

    reference_shape = shapes.get(island.reference)
    if reference_shape is None:
        return f"output shape of {island.node.name} unknown"
    producers, consumers = _index(fp32.graph)
    node = next((n for n in fp32.graph.node if n.name == island.node.name), None)
    if node is None:
        return f"{island.node.name} not found in the fp32 model"
    chain, out = [node], node.output[0]
    while out != island.reference:
        users = consumers.get(out, [])
        if len(users) != 1 or len(chain) > 3:
            return f"the fp32 nodes between {node.name} and {island.reference} are not a chain"
        chain.append(users[0])
        out = users[0].output[0]
    initializers = {init.name for init in fp32.graph.initializer}
    activations = [n for n in node.input if n and not _is_constant(n, initializers, producers)]
    for n in chain[1:]:
        activations += [i for i in n.input[1:] if i and not _is_constant(i, initializers, producers)
                        and i not in activations]
    if any(a not in shapes for a in activations) or any(
            source not in shapes for _, source in island.quantize):
        return f"input shape of {node.name} unknown"
    constant_nodes = [producers[n] for c in chain for n in c.input
                      if n in producers and producers[n].op_type == "Constant"]
    float_nodes = constant_nodes + chain
    float_form = candidate_model(
        float_nodes, {a: (shapes[a], np.float32) for a in activations},
        {island.reference: (reference_shape, np.float32)},
        _initializer_arrays(fp32, float_nodes), list(fp32.opset_import))

    inputs = {q.output[0]: (shapes[source], _zero_point_type(qdq, q))
              for q, source in island.quantize}
    nodes = list(island.dequantize) + [island.node]
    output_type = np.float32
    if island.output_quantize is not None:
        nodes.append(island.output_quantize)
        output_type = _zero_point_type(qdq, island.output_quantize)
    int8_form = candidate_model(nodes, inputs, {island.output: (reference_shape, output_type)},
                                _initializer_arrays(qdq, nodes), list(qdq.opset_import))
    return float_form, int8_form


# ---------------------------------------------------------------------------------------------
# Calibration data for onnxruntime


def calibration_feeds(calibration: CalibrationSource, input_names: list[str]
                      ) -> Iterator[dict[str, np.ndarray]]:
    """The calibration batches as feeds of the model's inputs (``Calibration.feeds``; a
    calibration source without it feeds its ``inputs`` array to a single-input model)."""
    feeds = getattr(calibration, "feeds", None)
    if callable(feeds):
        yield from feeds(input_names=input_names)
        return
    if len(input_names) != 1:
        raise DataError(f"the model has {len(input_names)} inputs ({', '.join(input_names)}); "
                        "calibration data feeds a single one")
    inputs = calibration.inputs
    step = max(1, int(getattr(calibration, "batch_size", 128)))
    for start in range(0, len(inputs), step):
        yield {input_names[0]: inputs[start : start + step]}


def _reader(calibration: CalibrationSource, input_names: list[str]):
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self):
            self._feeds = calibration_feeds(calibration, input_names)

        def get_next(self):
            return next(self._feeds, None)

    return FeedReader()


@contextmanager
def _quantizer_log(notes: list[str]):
    """onnxruntime's quantizer warns through the root logger: keep what it says as notes
    (its advice to pre-process is left out: cleanup has folded BatchNorm and constants, and
    its graph optimisation would rename the nodes the decisions are keyed by)."""

    class Keep(logging.Handler):
        def emit(self, record):
            message = record.getMessage().strip()
            if "pre-process" not in message and message not in notes:
                notes.append(f"onnxruntime quantizer: {message}")

    handler = Keep(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def _cpu_has_vnni() -> bool | None:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _quant_settings(config: QuantizeConfig) -> tuple[str, bool, str]:
    """(activation type, reduce_range, why) following onnxruntime's advice for this CPU
    (``quantize_static``'s docstring, "Choosing parameters for CPU inference")."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    activations = config.activations
    if activations == "auto":
        activations = "uint8" if x86 else "int8"
    if config.reduce_range is not None:
        reduce_range, why = config.reduce_range, "as configured"
    elif not x86:
        reduce_range, why = False, "not x86"
    else:
        vnni = _cpu_has_vnni()
        reduce_range = not vnni
        why = "this CPU has VNNI" if vnni else "no VNNI found: 7-bit weights avoid saturation"
    return activations, reduce_range, why


def _quantize_static(source: Path, out: Path, activations: str, reduce_range: bool,
                     excluded: Sequence[str] = (), **calibration) -> None:
    """onnxruntime's ``quantize_static`` as this module uses it: QDQ, per-channel symmetric
    int8 weights, ``activations`` (symmetric when int8); ``calibration`` names the reader or
    the cached ranges."""
    import onnxruntime.quantization as ortq

    calibration.setdefault("calibration_data_reader", None)
    ortq.quantize_static(
        str(source), str(out), quant_format=ortq.QuantFormat.QDQ,
        op_types_to_quantize=list(OPS_TO_QUANTIZE), per_channel=True, reduce_range=reduce_range,
        activation_type=(ortq.QuantType.QUInt8 if activations == "uint8"
                         else ortq.QuantType.QInt8),
        weight_type=ortq.QuantType.QInt8, nodes_to_exclude=list(excluded),
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": activations == "int8"},
        **calibration)


def int8_candidate(proto: onnx.ModelProto, feed: Mapping[str, np.ndarray],
                   excluded: Sequence[str] = (),
                   config: QuantizeConfig | None = None) -> onnx.ModelProto:
    """``proto`` as ``QuantizeInt8Pass`` would write it with every node it can quantize in
    int8 (but ``excluded``), its ranges calibrated on ``feed``: the int8 form of a candidate
    whose time another pass weighs against its own options (fast-conv, when the int8 stage
    follows it). For timing: its values matter only as far as ``feed`` is representative."""
    from onnxruntime.quantization import CalibrationDataReader

    activations, reduce_range, _ = _quant_settings(config or QuantizeConfig())

    class OneFeed(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter([dict(feed)])

        def get_next(self):
            return next(self._feeds, None)

    with tempfile.TemporaryDirectory(prefix="compressor-int8-candidate-") as tmp:
        source, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, str(source))
        with _quantizer_log([]):
            _quantize_static(source, out, activations, reduce_range, excluded,
                             calibration_data_reader=OneFeed())
        quantized = onnx.load(str(out))
    quantized.ir_version = min(quantized.ir_version, MAX_IR_VERSION)
    return quantized


# ---------------------------------------------------------------------------------------------
# The pass


@dataclass
class _Decision:
    name: str
    op: str
    int8: bool = True
    reason: str | None = None
    error: float | None = None
    fp32_ms: float | None = None
    int8_ms: float | None = None
    slower_alone: bool = False  # int8 measured slower as a candidate of its own
    extra: list[str] = field(default_factory=list)

    def timing(self) -> str:
        return (f"fp32 {self.fp32_ms:.3g} ms vs int8 {self.int8_ms:.3g} ms"
                if self.int8_ms is not None else "")


class QuantizeInt8Pass(Pass):
    """Quantize to int8 with onnxruntime (static QDQ, per-channel symmetric int8 weights,
    activations as onnxruntime recommends for this CPU, ranges calibrated on ``calibration``).

    The pipeline runs it last. Each node with an int8 kernel is quantized unless its own int8
    output error exceeds ``max_error``, or -- when ``latency`` (a
    ``compressor.latency.LatencyTable``) is given -- its int8 form is measured slower than its
    fp32 form at the table's batch; with a table the whole model is timed as well, and if the
    result is slower than the fp32 model it is left in fp32. Custom ops and ops without an int8
    kernel stay fp32. The records say, node by node, int8 or fp32 and why.
    """

    name = "quantize"
    config_class = QuantizeConfig

    def __init__(self, config: QuantizeConfig | None = None,
                 calibration: CalibrationSource | None = None,
                 latency: LatencySource | None = None):
        super().__init__(config)
        self.calibration = calibration
        self.latency = latency

    def requires(self, model: ir.Model) -> None:
        if self.calibration is None:
            raise OptionError("quantize: int8 quantization needs calibration data (--data)")
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < 10:
            raise PassError(self.name, f"the model's opset is {opset}; int8 quantization "
                            "needs opset 10 or later (re-export the model)")

    def call(self, model: ir.Model) -> PassResult:
        config: QuantizeConfig = self.config
        notes: list[str] = []
        scope = NameScope(model.graph)
        seen: set[str] = set()
        for node in model.graph:  # decisions go by node name: every node needs a unique one
            if not node.name or node.name in seen:
                node.name = scope(node.name or node.op_type)
            seen.add(node.name)
        fp32 = ir.serde.serialize_model(model)
        fp32.ir_version = min(fp32.ir_version, MAX_IR_VERSION)
        initializers = {init.name for init in fp32.graph.initializer}
        input_names = [i.name for i in fp32.graph.input if i.name not in initializers]
        fp32_tensors = {out for node in fp32.graph.node for out in node.output} | set(input_names)

        activations, reduce_range, why = _quant_settings(config)
        notes.append(f"int8: weights int8 symmetric per channel, activations {activations} "
                     f"({'symmetric' if activations == 'int8' else 'asymmetric'}), "
                     f"reduce_range {'on' if reduce_range else 'off'} ({why}), "
                     f"{config.calibration} ranges on the calibration data")

        decisions: dict[str, _Decision] = {}
        for node in fp32.graph.node:
            if node.domain not in _DEFAULT_DOMAINS:
                decisions[node.name] = _Decision(
                    node.name, node.op_type, int8=False,
                    reason=f"custom op {node.domain}::{node.op_type}: onnxruntime cannot quantize it")
            elif node.op_type in NO_INT8_KERNEL:
                decisions[node.name] = _Decision(
                    node.name, node.op_type, int8=False,
                    reason=f"onnxruntime's CPU provider has no int8 {node.op_type} kernel")
            elif node.op_type in INT8_KERNELS:
                decision = _Decision(node.name, node.op_type)
                if node.name in config.exclude:
                    decision.int8, decision.reason = False, "excluded by the configuration"
                decisions[node.name] = decision
        unknown = set(config.exclude) - {node.name for node in fp32.graph.node}
        if unknown:
            raise OptionError(f"quantize: no node named {', '.join(sorted(unknown))} to exclude")

        with tempfile.TemporaryDirectory(prefix="compressor-int8-") as tmp, _quantizer_log(notes):
            work = Path(tmp)
            fp32_path = work / "fp32.onnx"
            first = next(calibration_feeds(self.calibration, input_names))
            onnx.save(_with_types(onnx.ModelProto.FromString(fp32.SerializeToString()),
                                  _observe(fp32, first)), str(fp32_path))
            cache = work / "ranges.json"
            method = self._calibrate(fp32, fp32_path, cache, work, input_names)

            def quantize(excluded: list[str]) -> onnx.ModelProto:
                out = work / f"int8_{len(excluded)}.onnx"
                _quantize_static(fp32_path, out, activations, reduce_range, excluded,
                                 calibrate_method=method, calibration_cache_path=str(cache))
                proto = onnx.load(str(out))
                proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
                return _float_graph_outputs(proto)

            def fp32_names() -> list[str]:
                return [d.name for d in decisions.values() if not d.int8]

            def settle() -> onnx.ModelProto:
                """Quantize with the current decisions until no fp32 node reading int8
                values errs more than allowed (each round gives back int8 nodes)."""
                while True:
                    qdq = quantize(fp32_names())
                    self._unsupported(qdq, decisions)
                    if not self._check_fp32_readers(fp32, qdq, decisions, fp32_tensors,
                                                    input_names, notes):
                        return qdq

            qdq = quantize(fp32_names())
            self._unsupported(qdq, decisions)
            errors = self._measure_errors(fp32, qdq, self._int8_islands(qdq, decisions,
                                                                         fp32_tensors),
                                          input_names)
            for name, error in errors.items():
                d = decisions[name]
                d.error = error
                if error > config.max_error:
                    d.int8, d.reason = False, f"int8 error {error:.3g} > max_error {config.max_error:g}"
            final = within_error = settle()
            if self.latency is not None:
                snapshot = copy.deepcopy(decisions)
                self._measure_times(fp32, within_error, decisions, fp32_tensors, input_names)
                if any(d.slower_alone for d in decisions.values()):
                    final = settle()
                winner = self._whole_model_check(fp32, final, within_error, decisions, notes,
                                                 input_names)
                if winner == "all":
                    for name, d in snapshot.items():
                        timed = decisions[name]
                        d.fp32_ms, d.int8_ms = timed.fp32_ms, timed.int8_ms
                        d.slower_alone, d.extra = timed.slower_alone, timed.extra
                    decisions = snapshot
                final = {"fp32": fp32, "chosen": final, "all": within_error}[winner]

        int8 = set(int8_nodes(final)) if any(d.int8 for d in decisions.values()) else set()
        return self._result(model, fp32, final, int8, decisions, notes)

    # -- steps -----------------------------------------------------------------------------
    def _calibrate(self, fp32: onnx.ModelProto, path: Path, cache: Path, work: Path,
                   input_names: list[str]):
        """Activation ranges by onnxruntime's own calibrator, saved where ``quantize_static``
        reads them (so each quantize call reuses them). The calibrator's session is ours so that
        models with custom ops load (it would not register the library)."""
        from onnxruntime.quantization import calibrate as ortc

        method = {"minmax": ortc.CalibrationMethod.MinMax,
                  "entropy": ortc.CalibrationMethod.Entropy,
                  "percentile": ortc.CalibrationMethod.Percentile}[self.config.calibration]
        augmented = str(work / "augmented.onnx")
        ops = list(OPS_TO_QUANTIZE)
        if method == ortc.CalibrationMethod.MinMax:
            # Its augmented model outputs each tensor's min and max, not the tensor, so the
            # batches need not be merged as they come (max_intermediate_outputs would: in
            # onnxruntime 1.32 it drops the batches instead of merging them).
            calibrator = ortc.MinMaxCalibrater(str(path), ops, augmented)
        elif method == ortc.CalibrationMethod.Entropy:
            calibrator = ortc.EntropyCalibrater(str(path), ops, augmented)
        else:
            calibrator = ortc.PercentileCalibrater(str(path), ops, augmented, symmetric=True)
        calibrator.augment_graph()
        so = runtime.session_options()
        so.graph_optimization_level = runtime._ort().GraphOptimizationLevel.ORT_DISABLE_ALL
        if runtime.uses_custom_ops(fp32):
            runtime.register_library(so)
        calibrator.infer_session = runtime.inference_session(
            augmented, sess_options=so, providers=[runtime.PROVIDERS["cpu"]])
        calibrator.collect_data(_reader(self.calibration, input_names))
        ortc.save_tensors_data(calibrator.compute_data(), cache)
        return method

    @staticmethod
    def _unsupported(qdq: onnx.ModelProto, decisions: dict[str, _Decision]) -> None:
        quantized = set(int8_nodes(qdq))
        for d in decisions.values():
            if d.int8 and d.name not in quantized:
                d.int8 = False
                d.reason = ("not supported: onnxruntime's quantizer left it in float "
                            "(e.g. a weight that is not a constant, or inputs without a range)")

    @staticmethod
    def _int8_islands(qdq, decisions, fp32_tensors) -> list[_Island]:
        index = _index(qdq.graph)
        by_name = {n.name: n for n in qdq.graph.node}
        islands = []
        for d in decisions.values():
            if d.int8:
                island = _island(qdq, index, by_name[d.name], fp32_tensors)
                if island is None:
                    d.extra.append("error not measured (its quantized inputs are not traced)")
                else:
                    islands.append(island)
        return islands

    def _measure_errors(self, fp32, qdq, islands, input_names) -> dict[str, float]:
        """||y_island - y|| / ||y|| of each island's output on the calibration data, the
        island fed with the fp32 model's tensors."""
        if not islands:
            return {}
        probe, pairs = _probe_model(fp32, qdq, islands)
        session = runtime.session(probe)
        names = list(dict.fromkeys(n for _, ref, out in pairs for n in (ref, out)))
        diff = defaultdict(float)
        energy = defaultdict(float)
        for feed in calibration_feeds(self.calibration, input_names):
            values = dict(zip(names, session.run(names, feed), strict=True))
            for node, ref, out in pairs:
                y = values[ref].astype(np.float64)
                diff[node] += float(np.sum((values[out] - y) ** 2))
                energy[node] += float(np.sum(y**2))
        return {node: (float(np.sqrt(diff[node] / energy[node])) if energy[node] > 0
                       else (0.0 if diff[node] == 0 else float("inf"))) for node, _, _ in pairs}

    def _check_fp32_readers(self, fp32, qdq, decisions, fp32_tensors, input_names, notes
                            ) -> bool:
        """An fp32 node next to int8 ones reads their dequantized values: its error on them
        must be within ``max_error`` too, else the int8 nodes that quantize what it reads go
        back to fp32 (an outlier that sets a tensor's range hurts the tensor's every reader).
        Returns whether a decision changed."""
        index = _index(qdq.graph)
        producers, consumers = index
        int8 = set(int8_nodes(qdq))
        initializers = {init.name for init in qdq.graph.initializer}
        readers = []
        for node in qdq.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.name in int8:
                continue
            reads = [producers.get(n) for n in node.input if n]
            if any(p is not None and p.op_type == "DequantizeLinear"
                   and not _is_constant(p.input[0], initializers, producers) for p in reads):
                island = _island(qdq, index, node, fp32_tensors, with_output=False)
                if island is not None:
                    readers.append(island)
        errors = self._measure_errors(fp32, qdq, readers, input_names)
        bound = self.config.max_error
        changed = False
        for island in readers:
            name, error = island.node.name, errors[island.node.name]
            if error <= bound:
                continue
            blamed = False
            for q, _ in island.quantize:
                for culprit, role in self._quantizers_of(q, index, decisions, int8):
                    d = decisions[culprit]
                    d.int8, blamed, changed = False, True, True
                    d.reason = (f"its quantized {role} costs {name} (fp32) error {error:.3g} > "
                                f"max_error {bound:g}")
            if not blamed:
                note = f"{name} (fp32) reads int8 values with error {error:.3g} > max_error {bound:g}"
                if note not in notes:
                    notes.append(note)
        return changed

    @staticmethod
    def _quantizers_of(q: onnx.NodeProto, index, decisions, int8) -> list[tuple[str, str]]:
        """The int8 nodes whose being int8 puts QuantizeLinear ``q`` in the model: the node
        whose output it quantizes (through ops that only move int8 values) and the int8 nodes
        that read its values. (name, 'output' or 'input')."""
        producers, consumers = index
        found = []
        node = producers.get(q.input[0])
        while node is not None:
            if node.name in decisions:
                if decisions[node.name].int8:
                    found.append((node.name, "output"))
                break
            if node.name not in int8:  # an fp32 node: the Q is there for the readers
                break
            dq = producers.get(node.input[0])  # an int8 pass-through op: look through it
            if dq is None or dq.op_type != "DequantizeLinear":
                break
            before = producers.get(dq.input[0])
            if before is None or before.op_type != "QuantizeLinear":
                break
            node = producers.get(before.input[0])
        for dq in consumers.get(q.output[0], []):
            for user in consumers.get(dq.output[0], []):
                if user.name in decisions and decisions[user.name].int8:
                    found.append((user.name, "input"))
        return found

    def _batch(self) -> int:
        return int(self.latency.context.batch)

    def _measure_times(self, fp32, qdq, decisions, fp32_tensors, input_names) -> None:
        batch = self._batch()
        feed = _rows(next(calibration_feeds(self.calibration, input_names)), batch)
        shapes = {name: shape for name, (shape, _) in _observe(fp32, feed).items()}
        index = _index(qdq.graph)
        by_name = {n.name: n for n in qdq.graph.node}
        for d in decisions.values():
            if not d.int8:
                continue
            island = _island(qdq, index, by_name[d.name], fp32_tensors)
            built = "its quantized inputs are not traced" if island is None else _candidates(
                fp32, qdq, island, shapes)
            if isinstance(built, str):
                d.extra.append(f"not timed ({built})")
                continue
            float_form, int8_form = built
            try:
                fp32_ms = float(self.latency.time(float_form))
                int8_ms = float(self.latency.time(int8_form))
            except CompressionError as e:  # e.g. a candidate with a fixed batch size
                d.extra.append(f"not timed ({e})")
                continue
            d.fp32_ms, d.int8_ms = fp32_ms, int8_ms
            if d.fp32_ms / d.int8_ms < self.config.min_speedup:
                d.int8, d.slower_alone = False, True
                d.reason = f"int8 measured slower: {d.timing()} at batch {batch}"

    def _whole_model_check(self, fp32, chosen, within_error, decisions, notes, input_names
                           ) -> str:
        """The fp32 model, the node-by-node choice and every node within the error bound in
        int8, timed side by side on calibration inputs: the name of the fastest ('fp32',
        'chosen', 'all'). The Q/DQ at the borders between int8 and fp32 runs cost time that
        no node's candidate shows."""
        batch = self._batch()
        chosen_int8 = set(int8_nodes(chosen))
        models = {"fp32": fp32}
        if chosen_int8:
            models["chosen"] = chosen
        if set(int8_nodes(within_error)) - chosen_int8:
            models["all"] = within_error
        if len(models) == 1:
            return "fp32"
        feeds = next(calibration_feeds(self.calibration, input_names))
        times = {name: float(ms) for name, ms in self.latency.compare(models, feeds).items()}
        best = min(times, key=times.get)
        summary = ", ".join(f"{label} {times[name]:.3g} ms" for name, label in
                            (("fp32", "fp32"), ("chosen", "node by node"),
                             ("all", "all within max_error")) if name in times)
        notes.append(f"whole model at batch {batch}: {summary}")
        if best == "fp32":
            fastest = min(ms for name, ms in times.items() if name != "fp32")
            reason = (f"the quantized model as a whole measured slower: fp32 {times['fp32']:.3g} "
                      f"ms vs int8 {fastest:.3g} ms at batch {batch}")
            notes.append(f"{reason}: kept fp32")
            for d in decisions.values():
                if d.int8 or d.slower_alone:
                    d.int8, d.reason = False, reason + (f" (alone: {d.timing()})"
                                                        if d.timing() else "")
        elif best == "all":
            for d in decisions.values():
                if d.slower_alone:
                    d.extra.append(f"slower alone ({d.timing()}) but the whole model is faster "
                                   f"with it int8: {times['all']:.3g} ms vs "
                                   f"{times.get('chosen', times['fp32']):.3g} ms")
        return best

    def _result(self, model, fp32, final, int8, decisions, notes) -> PassResult:
        try:
            profile = {layer.name: layer for layer in profile_model(fp32).layers}
        except Exception:  # noqa: BLE001 - costs are for the table only
            profile = {}
        records = []
        for node in fp32.graph.node:
            d = decisions.get(node.name)
            if d is None and node.name not in int8:
                continue
            layer = profile.get(node.name)
            weight = layer.weight_shape if layer else None
            macs, params = (layer.macs, layer.params) if layer else (0, 0)
            if d is None:  # a node that moves int8 values between quantized nodes
                detail, skipped, error = "int8 (moves int8 values between quantized nodes)", None, None
            else:
                timing = [d.timing()] if d.timing() and not d.slower_alone else []
                detail = ", ".join(["int8"] + timing + d.extra) if d.int8 else "; ".join(d.extra)
                skipped, error = (None if d.int8 else d.reason), d.error
            records.append(LayerRecord(
                name=node.name, op=node.op_type, shape_before=weight, shape_after=weight,
                macs_before=macs, macs_after=macs, params_before=params, params_after=params,
                error=error, error_basis="calibration" if error is not None else "",
                detail=detail, skipped=skipped))
        modified = bool(int8)
        if modified:
            model = ir.serde.deserialize_model(final)
        decided = sum(1 for d in decisions.values() if d.int8)
        stats = {
            "int8_nodes": len(int8),
            "int8_compute_nodes": decided,
            "fp32_nodes": sum(1 for d in decisions.values() if not d.int8),
            "bytes_before": fp32.ByteSize(),
            "bytes_after": final.ByteSize() if modified else fp32.ByteSize(),
            "batch": self._batch() if self.latency is not None else None,
        }
        if not modified:
            notes.append("no node was quantized: the model stays fp32")
        return PassResult(model=model, modified=modified, layers=records, notes=notes, stats=stats)
