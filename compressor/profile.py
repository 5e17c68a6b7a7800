"""Per-layer profile of an ONNX graph: op, shapes, parameters and multiply-accumulates.

MACs are counted per sample (batch 1) for the ops that dominate inference cost: Conv,
ConvTranspose, Gemm, MatMul and our custom ops (which register their own counter). Everything
else counts as zero MACs, the usual convention of FLOP counters in this field.

A model may have several inputs of any type (token ids, masks, images): each one's batch
dimension is set to 1; its other symbolic dimensions (a dynamic sequence length) are taken
from the per-sample shapes passed in (``--input-shape``, or the data's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from compressor.errors import UnsupportedModelError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerProfile:
    """Cost of one node at batch 1."""

    name: str
    op: str
    input_shape: Shape | None
    output_shape: Shape | None
    weight_shape: Shape | None
    params: int
    macs: int


@dataclass(frozen=True)
class InputProfile:
    """One graph input: its element type and shape at batch 1."""

    name: str
    dtype: str  # numpy's name: "float32", "int64", "bool"
    shape: Shape


@dataclass(frozen=True)
class ModelProfile:
    """Cost of a whole graph at batch 1. ``input_shape`` is the first input's; ``inputs``
    lists every input."""

    layers: tuple[LayerProfile, ...]
    params: int
    macs: int
    input_shape: Shape
    file_bytes: int | None = None
    ops: dict[str, int] = field(default_factory=dict)
    inputs: tuple[InputProfile, ...] = ()

    def layer(self, name: str) -> LayerProfile:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


# op_type -> fn(node, shapes, initializers) -> MACs; custom ops add themselves here.
MacCounter = Callable[[onnx.NodeProto, dict[str, Shape], Mapping[str, np.ndarray]], int]
MAC_COUNTERS: dict[tuple[str, str], MacCounter] = {}


# Modules that register the MAC counters of our custom ops (domain ai.compressor); imported on
# first use so that profiling a compressed model counts them whoever imported what.
CUSTOM_OP_COUNTER_MODULES = ("compressor.passes.diffconv", "compressor.passes.fast_conv")


def _load_custom_op_counters() -> None:
    import importlib

    for module in CUSTOM_OP_COUNTER_MODULES:
        importlib.import_module(module)


def register_mac_counter(op_type: str, domain: str = "") -> Callable[[MacCounter], MacCounter]:
    """Decorator: count MACs of ``domain::op_type`` nodes with the decorated function."""

    def wrap(fn: MacCounter) -> MacCounter:
        MAC_COUNTERS[(domain, op_type)] = fn
        return fn

    return wrap


# Element types that hold learned values. Integer tensors of other types are shapes, axes or
# indices (Reshape's shape, Gather's indices), not parameters.
_PARAM_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT4,
        onnx.TensorProto.UINT4,
    }
)


class _LazyArrays(Mapping):
    """Initializers as numpy arrays, converted only when a MAC counter asks for one."""

    def __init__(self, tensors: dict[str, onnx.TensorProto]):
        self._tensors = tensors
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self._tensors[name])
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@register_mac_counter("Conv")
@register_mac_counter("ConvTranspose")
def _conv_macs(node, shapes, inits) -> int:
    w = shapes.get(node.input[1])
    if node.op_type == "Conv":
        out = shapes.get(node.output[0])
        if w is None or out is None:
            return 0
        return math.prod(out) * math.prod(w[1:])
    x = shapes.get(node.input[0])
    if w is None or x is None:
        return 0
    return math.prod(x) * math.prod(w[1:])


@register_mac_counter("Gemm")
def _gemm_macs(node, shapes, inits) -> int:
    a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
    if a is None or b is None:
        return 0
    m = a[1] if _attr(node, "transA", 0) else a[0]
    k = a[0] if _attr(node, "transA", 0) else a[1]
    n = b[0] if _attr(node, "transB", 0) else b[1]
    return m * k * n


@register_mac_counter("MatMul")
def _matmul_macs(node, shapes, inits) -> int:
    a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
    if a is None or out is None or not a:
        return 0
    return math.prod(out) * a[-1]


def static_shapes(
    model: onnx.ModelProto,
    batch: int = 1,
    input_shapes: Mapping[str, Shape] | None = None,
) -> tuple[dict[str, Shape], Shape]:
    """Infer every tensor's shape with the graph inputs' batch dimension set to ``batch`` and
    their other symbolic dimensions from ``input_shapes`` (per-sample shapes by input name).

    Returns the shapes by tensor name and the first graph input's shape.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    init_names = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init_names]
    if not graph_inputs:
        raise UnsupportedModelError("the model has no graph input")
    input_shapes = input_shapes or {}
    for value in graph_inputs:
        given = input_shapes.get(value.name)
        tensor_type = value.type.tensor_type
        if given is not None and not tensor_type.HasField("shape"):  # rank unknown: set it
            for _ in range(len(given) + 1):
                tensor_type.shape.dim.add()
        dims = tensor_type.shape.dim
        if given is not None and len(given) != len(dims) - 1:
            raise UnsupportedModelError(
                f"input '{value.name}' has {len(dims) - 1} per-sample dimensions but its "
                f"given shape {tuple(given)} has {len(given)}"
            )
        for i, d in enumerate(dims):
            if i == 0:
                if not d.HasField("dim_value"):
                    d.Clear()
                    d.dim_value = batch
            elif given is not None:
                d.Clear()
                d.dim_value = int(given[i - 1])
            elif not d.HasField("dim_value"):
                raise UnsupportedModelError(
                    f"input '{value.name}' has a symbolic dimension {i} ('{d.dim_param}'); "
                    f"pass --input-shape {value.name}:DIMS"
                )
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, Shape] = {}
    for vi in (
        list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    ):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    first = graph_inputs[0]
    if first.name not in shapes:
        raise UnsupportedModelError(
            f"input '{first.name}' has no static shape (rank unknown); pass --input-shape"
        )
    missing = [out for node in model.graph.node for out in node.output
               if out and out not in shapes and node.op_type != "Constant"]
    if missing:
        shapes.update(_shapes_by_execution(model, graph_inputs, shapes, missing))
    return shapes, shapes[first.name]


def _shapes_by_execution(model, graph_inputs, shapes, names) -> dict[str, Shape]:
    """Shapes ONNX inference cannot give (our custom ops have no ONNX schema, and every
    tensor after them loses its shape): run the model once on zeros and read them off."""
    from compressor import runtime

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        sess = runtime.session(probe)
        feeds = {}
        for value in graph_inputs:
            elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feeds[value.name] = np.zeros(shapes[value.name], dtype=elem)
        outputs = sess.run(list(names), feeds)
    except Exception:  # noqa: BLE001 - no runtime or the model fails: shapes stay unknown
        return {}
    return {name: tuple(out.shape) for name, out in zip(names, outputs, strict=True)
            if hasattr(out, "shape")}


def _type_name(elem_type: int) -> str:
    """numpy's name of an ONNX element type ("float32", "int64"), else ONNX's own."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def profile_model(
    model: onnx.ModelProto,
    file_bytes: int | None = None,
    input_shapes: Mapping[str, Shape] | None = None,
) -> ModelProfile:
    """Profile ``model`` at batch 1 (shapes from ONNX shape inference; ``input_shapes``, per
    sample by input name, fix the dimensions the graph leaves symbolic)."""
    if any(node.domain not in ("", "ai.onnx") for node in model.graph.node):
        _load_custom_op_counters()
    shapes, input_shape = static_shapes(model, batch=1, input_shapes=input_shapes)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes hold weights too (torch exports some)
        if node.op_type == "Constant" and node.output:
            tensor = _attr(node, "value")
            if tensor is not None:
                inits[node.output[0]] = tensor
    arrays = _LazyArrays(inits)
    counted: set[str] = set()
    layers: list[LayerProfile] = []
    ops: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Constant":
            continue
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        # Every constant input holding learned values is a parameter, in whichever slot it
        # sits (Gather's table is input 0); a tensor shared by several nodes counts once,
        # at its first consumer.
        weights = [n for n in node.input if n in inits and inits[n].data_type in _PARAM_TYPES]
        params = 0
        for name in weights:
            if name not in counted:
                counted.add(name)
                params += math.prod(inits[name].dims)
        weight_shape = None
        if len(node.input) > 1 and node.input[1] in weights:
            weight_shape = tuple(inits[node.input[1]].dims)
        elif weights:
            weight_shape = tuple(inits[weights[0]].dims)
        counter = MAC_COUNTERS.get((node.domain or "", node.op_type))
        macs = int(counter(node, shapes, arrays)) if counter else 0
        layers.append(
            LayerProfile(
                name=node.name or f"{node.op_type}_{i}",
                op=node.op_type,
                input_shape=shapes.get(node.input[0]) if node.input else None,
                output_shape=shapes.get(node.output[0]) if node.output else None,
                weight_shape=weight_shape,
                params=params,
                macs=macs,
            )
        )
    params = sum(math.prod(inits[n].dims) for n in counted)
    init_names = {init.name for init in model.graph.initializer}
    inputs = tuple(
        InputProfile(value.name, _type_name(value.type.tensor_type.elem_type),
                     shapes.get(value.name, ()))
        for value in model.graph.input
        if value.name not in init_names
    )
    return ModelProfile(
        layers=tuple(layers),
        params=params,
        macs=sum(layer.macs for layer in layers),
        input_shape=input_shape,
        file_bytes=file_bytes,
        ops=ops,
        inputs=inputs,
    )


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """numpy view of an initializer (external data must already be loaded)."""
    return numpy_helper.to_array(tensor)
