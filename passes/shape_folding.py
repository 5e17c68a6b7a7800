"""Fold run-time shape computations that read only static dimensions into constants.

Exporters write ``x.shape`` arithmetic as Shape → Gather/Slice → Cast → Div/Ceil/... → Concat
chains; timm's TF-style SAME padding (``Conv2dSame``/``pad_same``) computes every Pad's pads
that way. With a dynamic batch axis the Shape itself is not constant, so constant folding
stops at it, the Pad keeps run-time pads and the channel analysis cannot see through it. This
pass walks the graph once, tracking each small tensor's entries as known or not (a Shape of a
``N x 3 x 224 x 224`` tensor is ``[?, 3, 224, 224]``), evaluates what it can with onnx's
reference ops and infers each node's output shape with onnx's per-node shape inference
(with the values found so far), so a Pad whose pads become constant gives the next Shape a
static shape in the same sweep. Values that end up fully known become initializers; what
reads the batch dimension stays.

Measured first (onnx 1.23.2, onnx-ir 1.1.0, onnxscript 0.7.2, onnxslim 0.1.98, torch 2.13) on
a three-Conv2dSame net (stride 2 / depthwise k5 / stride 2, input 3x23x22), counting the
nodes computed from a Shape and whether the Pads' pads are constant afterwards:

- ``dynamo=True`` export, dynamic or static batch: 0 Shape-derived nodes, no Pad left:
  torch.export specialises H and W and the exporter's own optimizer fuses the Pads into the
  Convs. Nothing to do.
- TorchScript export (``dynamo=False``), 157 Shape-derived nodes with a dynamic batch, 114
  with a static one; every Pad's pads are computed at run time.
  onnxscript ``fold_constants(onnx_shape_inference=True)`` leaves 127 / 84 and every Pad
  dynamic; ``optimizer.optimize`` 116 / 76. Two gaps: it keeps ConstantOfShape (by design,
  to bound model size; the legacy ``F.pad`` lowering needs it), which stops the static case
  at the first Pad; allowing it (``should_fold``) folds the static case fully (0 left), but
  with a dynamic batch 127 stay, because its Gather folding takes only 1-D indices and the
  exporter gathers one dimension with a scalar index. onnx-ir's ShapeInferencePass adds
  nothing (127 / 84); ``onnx.shape_inference.infer_shapes(data_prop=True)`` infers but never
  rewrites (157 / 114).
  onnxslim folds everything (0 left) but wrongly: its shape inference evaluates
  ``Div(Cast(23 -> float), 2)`` as 11 where onnxruntime computes 11.5, so one Conv's pads
  come out [0,0,1,0] instead of [0,1,1,1] and the outputs differ by 3.6e-2; with
  ``no_shape_infer`` it is exact but leaves 4 Shape nodes.

So this pass adds what onnxscript misses (scalar-index Gather and the other data-movement
ops on partly known shapes, small ConstantOfShape) and leaves the rest to it. With it, cleanup
leaves 0 Shape-derived nodes in all four cases and folds the 3 Pads into the Convs, outputs
bit-identical under onnxruntime; an EfficientNet-Lite0-sized TorchScript export (1608 nodes,
51 Shape, 17 Pad) cleans up to 93 nodes with no Shape or Pad in 2.6 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx.reference import ReferenceEvaluator

from compressor.passes.base import Pass, PassConfig, PassResult
from compressor.passes.graph import NameScope

DEFAULT_DOMAINS = ("", "ai.onnx")
NONDETERMINISTIC = frozenset({
    "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial",
    "Bernoulli", "Dropout",
})
# Ops that only move entries: an output entry is known when the entry it comes from is. The
# value is which inputs carry entries (None: all); the others (indices, axes, shapes) must be
# fully known.
DATA_MOVEMENT: dict[str, tuple[int, ...] | None] = {
    "Gather": (0,), "Slice": (0,), "Concat": None, "Reshape": (0,), "Squeeze": (0,),
    "Unsqueeze": (0,), "Identity": (0,), "Flatten": (0,), "Transpose": (0,), "Expand": (0,),
    "Tile": (0,),
}
# Ops whose output entry depends only on the input entries at the same (broadcast) position.
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Neg", "Abs", "Ceil", "Floor", "Round",
    "Cast", "Clip", "Sqrt", "Pow", "Sign", "Reciprocal", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Where",
})


@dataclass(frozen=True)
class ShapeFoldingConfig(PassConfig):
    """``max_elements``: the largest tensor the pass evaluates or writes as a constant; shape
    computations are a few entries, this keeps it from materialising activations."""

    max_elements: int = 1024


@dataclass
class _Entries:
    """A small tensor whose entries are partly known; unknown entries hold a placeholder 1."""

    array: np.ndarray
    known: np.ndarray  # bool, same shape

    @property
    def complete(self) -> bool:
        return bool(self.known.all())


def _label(node: ir.Node) -> str:
    return node.name or f"{node.op_type} node"


def _declared_type(value: ir.Value) -> onnx.TypeProto | None:
    if value.type is None:
        return None
    proto = ir.serde.serialize_type(value.type)
    if value.shape is not None:
        ir.serde.serialize_shape_into(proto, value.shape)
    return proto


def _tensor_type(array: np.ndarray) -> onnx.TypeProto:
    dtype = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    return onnx.helper.make_tensor_type_proto(dtype, list(array.shape))


def _static_size(proto: onnx.TypeProto | None) -> int | None:
    """Element count of a tensor type whose dimensions are all known, else None."""
    if proto is None or proto.WhichOneof("value") != "tensor_type":
        return None
    tensor_type = proto.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    size = 1
    for dim in tensor_type.shape.dim:
        if not dim.HasField("dim_value"):
            return None
        size *= dim.dim_value
    return size


def _has_subgraph(node: ir.Node) -> bool:
    kinds = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    return any(attr.type in kinds for attr in node.attributes.values())


class _Sweep:
    """One topological walk: output types by per-node inference, entries by evaluation."""

    def __init__(self, model: ir.Model, max_elements: int):
        self.model = model
        self.max_elements = max_elements
        self.opsets = [
            onnx.helper.make_opsetid(domain, version)
            for domain, version in model.opset_imports.items()
        ]
        self.types: dict[ir.Value, onnx.TypeProto] = {}
        self.entries: dict[ir.Value, _Entries] = {}
        graph = model.graph
        for value in graph.inputs:
            declared = _declared_type(value)
            if declared is not None:
                self.types[value] = declared
        for value in graph.initializers.values():
            if value.const_value is None or value.is_graph_input():
                continue
            array = np.asarray(value.const_value.numpy())
            self.types[value] = _tensor_type(array)
            if array.size <= max_elements:
                self.entries[value] = _Entries(array, np.ones(array.shape, dtype=bool))

    def run(self) -> None:
        for node in self.model.graph:
            self.visit(node)

    # -- types -----------------------------------------------------------------------------
    def infer(self, node: ir.Node) -> dict[str, onnx.TypeProto]:
        """Output types by onnx's shape inference for this node, with the known inputs' values."""
        version = self.model.opset_imports.get(node.domain or "", None)
        if version is None and node.domain in DEFAULT_DOMAINS:
            version = self.model.opset_imports.get("ai.onnx" if not node.domain else "")
        if version is None or _has_subgraph(node):
            return {}
        input_types: dict[str, onnx.TypeProto] = {}
        input_data: dict[str, onnx.TensorProto] = {}
        for value in node.inputs:
            if value is None:
                continue
            if value.name is None or value not in self.types:
                return {}
            input_types[value.name] = self.types[value]
            entries = self.entries.get(value)
            if entries is not None and entries.complete:
                input_data[value.name] = onnx.numpy_helper.from_array(entries.array, value.name)
        if any(out.name is None for out in node.outputs):
            return {}
        try:
            schema = onnx.defs.get_schema(node.op_type, version, node.domain or "")
            return onnx.shape_inference.infer_node_outputs(
                schema,
                ir.serde.serialize_node(node),
                input_types,
                input_data,
                opset_imports=self.opsets,
                ir_version=self.model.ir_version,
            )
        except Exception:  # noqa: BLE001 - unknown ops, bad models: fall back to declared types
            return {}

    # -- entries ---------------------------------------------------------------------------
    def evaluate(self, node: ir.Node, arrays: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """The node's outputs by onnx's reference implementation of its op."""
        version = self.model.opset_imports.get(node.domain or "", 1)
        evaluator = ReferenceEvaluator(ir.serde.serialize_node(node), opsets={"": version})
        feeds = {
            value.name: array
            for value, array in zip(node.inputs, arrays, strict=True)
            if value is not None
        }
        return [np.asarray(out) for out in evaluator.run(None, feeds)]

    def shape_entries(self, node: ir.Node) -> _Entries | None:
        proto = self.types.get(node.inputs[0]) if node.inputs and node.inputs[0] else None
        if proto is None or proto.WhichOneof("value") != "tensor_type":
            return None
        if not proto.tensor_type.HasField("shape"):
            return None
        dims = list(proto.tensor_type.shape.dim)
        rank = len(dims)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        dims = dims[start:end]
        known = np.array([d.HasField("dim_value") for d in dims], dtype=bool)
        array = np.array([d.dim_value if d.HasField("dim_value") else 1 for d in dims], np.int64)
        return _Entries(array, known)

    def node_entries(self, node: ir.Node) -> list[_Entries] | None:
        """The entries of each output, or None when the node's outputs are not tracked."""
        if node.op_type == "Shape":
            entries = self.shape_entries(node)
            return None if entries is None else [entries]
        if node.op_type in NONDETERMINISTIC or _has_subgraph(node):
            return None
        inputs = [self.entries.get(v) if v is not None else None for v in node.inputs]
        tracked = all(
            e is not None for e, v in zip(inputs, node.inputs, strict=True) if v is not None
        )
        if not tracked:
            return None
        sizes = [_static_size(self.types.get(out)) for out in node.outputs]
        if any(size is None or size > self.max_elements for size in sizes):
            return None
        arrays = [e.array if e is not None else None for e in inputs]
        if all(e is None or e.complete for e in inputs):
            return [_Entries(out, np.ones(out.shape, dtype=bool))
                    for out in self.evaluate(node, arrays)]
        if node.op_type in DATA_MOVEMENT:
            carriers = DATA_MOVEMENT[node.op_type]
            carriers = range(len(inputs)) if carriers is None else carriers
            if any(e is not None and not e.complete
                   for i, e in enumerate(inputs) if i not in carriers):
                return None
            masks = [
                e.known.astype(np.int64) if i in carriers and e is not None else a
                for i, (e, a) in enumerate(zip(inputs, arrays, strict=True))
            ]
            values = self.evaluate(node, arrays)
            knowns = self.evaluate(node, masks)
            return [_Entries(v, k.astype(bool)) for v, k in zip(values, knowns, strict=True)]
        if node.op_type in ELEMENTWISE:
            (value,) = self.evaluate(node, arrays)
            known = np.ones(value.shape, dtype=bool)
            for e in inputs:
                if e is not None:
                    known &= np.broadcast_to(e.known, value.shape)
            return [_Entries(value, known)]
        return None

    def visit(self, node: ir.Node) -> None:
        inferred = self.infer(node) if node.domain in DEFAULT_DOMAINS else {}
        for out in node.outputs:
            proto = inferred.get(out.name) if out.name else None
            if proto is None or not proto.HasField("tensor_type") or not (
                    proto.tensor_type.HasField("shape")):
                proto = _declared_type(out) or proto
            if proto is not None:
                self.types[out] = proto
        if node.domain not in DEFAULT_DOMAINS:
            return
        try:
            outputs = self.node_entries(node)
        except Exception:  # noqa: BLE001 - an op the reference cannot run: leave it alone
            outputs = None
        if outputs is None:
            return
        for out, entries in zip(node.outputs, outputs, strict=True):
            self.entries[out] = entries
            self.types[out] = _tensor_type(entries.array)


class FoldShapeComputationsPass(Pass):
    """Replace computations of static shape values (through Shape, Gather, Slice, Concat,
    Cast, arithmetic, ...) by constants; keep what depends on dynamic dimensions."""

    name = "shape-folding"
    config_class = ShapeFoldingConfig
    config: ShapeFoldingConfig

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        common_passes.TopologicalSortPass()(model)
        sweep = _Sweep(model, self.config.max_elements)
        sweep.run()

        def folded(node: ir.Node) -> bool:
            return all(
                out in sweep.entries and sweep.entries[out].complete for out in node.outputs
            )

        foldable = [node for node in graph if node.op_type != "Constant" and folded(node)]
        foldable_set = set(foldable)
        # Nodes dead before the folding are left for dead-node removal (remove_dead=False).
        used = {node for node in foldable if any(out.uses() for out in node.outputs)}
        names = NameScope(graph)
        values_folded = 0
        for node in foldable:
            for out in node.outputs:
                if out.is_graph_output() or all(user in foldable_set for user, _ in out.uses()):
                    continue
                array = sweep.entries[out].array
                name = names(f"{out.name or node.op_type}_folded")
                constant = ir.Value(name=name, shape=ir.Shape(array.shape),
                                    const_value=ir.tensor(array, name=name))
                constant.dtype = constant.const_value.dtype
                graph.register_initializer(constant)
                ir.convenience.replace_all_uses_with(out, constant)
                values_folded += 1
        # Remove what the folding left dead: the folded nodes, and the nodes (Shape, Constant)
        # read only by removed ones. Nodes that were dead before stay for dead-node removal.
        removed: set[ir.Node] = set()
        for node in reversed(list(graph)):
            if any(out.is_graph_output() for out in node.outputs):
                continue
            users = [user for out in node.outputs for user, _ in out.uses()]
            if (node in used or users) and all(user in removed for user in users):
                removed.add(node)
        for node in reversed(list(graph)):
            if node in removed:
                graph.remove(node, safe=True)
        nodes_folded = sum(1 for node in removed if node.op_type != "Constant")
        notes = []
        kept = [node for node in graph if node.op_type == "Shape"]
        for node in kept:
            notes.append(f"Shape '{_label(node)}' kept: {self._why_kept(node, sweep)}")
        stats = {
            "shape_nodes_folded": nodes_folded,
            "shape_values_folded": values_folded,
            "shape_nodes_kept": len(kept),
        }
        return PassResult(model=model, modified=values_folded > 0, notes=notes, stats=stats)

    @staticmethod
    def _why_kept(node: ir.Node, sweep: _Sweep) -> str:
        source = node.inputs[0]
        entries = sweep.entries.get(node.outputs[0])
        if entries is None:
            return f"the shape of '{source.name}' is unknown"
        start = node.attributes.get_int("start", 0)
        rank = len(sweep.types[source].tensor_type.shape.dim)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        dims = [start + i for i, known in enumerate(entries.known.tolist()) if not known]
        if not dims:
            return "its value is static but is also a model output"
        listed = ", ".join(str(d) for d in dims)
        return f"it reads dimension {listed} of '{source.name}', which is dynamic"
