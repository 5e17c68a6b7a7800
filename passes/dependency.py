"""Channel dependencies on the ONNX graph: which tensors' channels are coupled and must shrink
together, and the one function that shrinks them.

Like Torch-Pruning's dependency graph, but on ONNX and apart from any criterion or pass: the
analysis walks the graph once and sorts every channel into a **group** (one mask for all
coupled tensors). A Conv, Gemm or MatMul with a constant weight starts a group (its output
channels); element-wise ops, BatchNormalization, pooling and residual Add/Sub/Mul pass it on
or join groups; Concat lays groups side by side and Split cuts them at group boundaries; a
depthwise Conv carries its input's groups (``block`` = channel multiplier); Flatten/Reshape into
a Gemm turns each channel into a block of ``H*W`` features. A tensor's channel axis is described
by a **layout**: the groups along it, in order, each with its block size.

Every parameter that follows a channel (producer weights' output rows, biases, BatchNorm
statistics, per-channel constants, depthwise filters) is a ``produce`` slice; every weight that
reduces over channels (a consumer's input columns) is a ``consume`` slice. ``shrink`` applies a
``ChannelTransform`` per group to all of them at once: pruning keeps rows, merging averages
``produce`` slices and sums ``consume`` slices.

A group is left alone (``reasons`` says why) when it reaches a model input or output, an op the
analysis does not model, a grouped conv, a Split through a group, a run-time reshape, or a
shared parameter used inconsistently: never a silently wrong graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from compressor.errors import UnsupportedModelError
from compressor.passes.graph import NameScope, constant_array
from compressor.profile import static_shapes

Shape = tuple[int, ...]

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal",
    "Identity", "Dropout", "Cast", "Mish", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
    "ThresholdedRelu", "Shrink", "Clip", "Swish",
})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Where", "Mean",
                    "Sum"})
POOL = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                  "GlobalLpPool"})
REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
                    "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare", "ReduceLogSum"})
RESHAPE = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
PER_CHANNEL_NORM = frozenset({"BatchNormalization", "InstanceNormalization"})
SOFTMAX = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Segment:
    """``size(group) * block`` consecutive entries of an axis; entry i is channel i // block."""

    group: int
    block: int = 1


Layout = tuple[Segment, ...]


@dataclass(frozen=True)
class ChannelAxis:
    """Where a tensor's channels are: ``axis`` (negative, counted from the end, since
    broadcasting aligns shapes from the right) and its layout."""

    axis: int
    layout: Layout


@dataclass(frozen=True)
class ParamSlice:
    """One axis of a constant parameter that follows channels.

    role: ``produce`` (the entries are the channels themselves: kept, or averaged on merging)
    or ``consume`` (the entries are summed over by a layer: kept, or added up on merging).
    kind: ``weight`` (a Conv/Gemm/MatMul weight), ``bias`` or ``param`` (BatchNorm statistics,
    per-channel constants of element-wise ops).
    """

    value: ir.Value
    axis: int
    layout: Layout
    role: str
    kind: str
    node: ir.Node


@dataclass
class ComputeLayer:
    """A Conv/ConvTranspose/Gemm/MatMul node and the layouts of its input and output channels
    (None when they are not channels the analysis tracks)."""

    node: ir.Node
    kind: str  # conv | depthwise | grouped | conv_transpose | gemm | matmul
    macs: int  # at batch 1
    in_layout: Layout | None
    out_layout: Layout | None
    weight_shape: Shape

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name


@dataclass
class ChannelGroup:
    """Channels that must be kept, removed or merged together."""

    id: int
    size: int
    tensors: list[str] = field(default_factory=list)
    slices: list[ParamSlice] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    origin: str = ""  # the node that created the group

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str | None:
        return "; ".join(dict.fromkeys(self.reasons)) if self.reasons else None

    @property
    def producers(self) -> list[ParamSlice]:
        return [s for s in self.slices if s.role == "produce"]

    @property
    def consumers(self) -> list[ParamSlice]:
        return [s for s in self.slices if s.role == "consume"]


@dataclass
class _Rewrite:
    """An attribute or shape constant that depends on a channel count."""

    kind: str  # reshape | group | split
    node: ir.Node
    layouts: tuple[Layout, ...]
    index: int = 0  # reshape: entry of the shape tensor


@dataclass
class DependencyGraph:
    """The result of ``analyze``: groups, tensors' channel axes, compute layers, rewrites."""

    groups: dict[int, ChannelGroup]
    axes: dict[ir.Value, ChannelAxis]
    layers: list[ComputeLayer]
    rewrites: list[_Rewrite]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.prunable]

    def length(self, layout: Layout | None, sizes: Mapping[int, int] | None = None) -> int:
        """Entries of an axis with ``layout`` when group g has ``sizes[g]`` channels."""
        if layout is None:
            return 0
        sizes = sizes or {}
        return sum(sizes.get(s.group, self.groups[s.group].size) * s.block for s in layout)

    def layer_macs(self, layer: ComputeLayer, sizes: Mapping[int, int]) -> int:
        """MACs of ``layer`` (batch 1) when group g keeps ``sizes[g]`` channels: linear in the
        output channels and, for a dense layer, in the input channels."""
        macs = float(layer.macs)
        if layer.out_layout is not None:
            macs *= self.length(layer.out_layout, sizes) / self.length(layer.out_layout)
        if layer.in_layout is not None and layer.kind not in ("depthwise", "grouped"):
            macs *= self.length(layer.in_layout, sizes) / self.length(layer.in_layout)
        return int(round(macs))

    def macs(self, sizes: Mapping[int, int]) -> int:
        return sum(self.layer_macs(layer, sizes) for layer in self.layers)

    def describe(self) -> list[dict]:
        """One row per group: size, origin, tensors, reason (for debugging and reports)."""
        return [
            {"group": g.id, "size": g.size, "origin": g.origin, "tensors": g.tensors,
             "prunable": g.prunable, "reason": g.reason}
            for g in self.groups.values()
        ]


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
        return min(a, b)


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name or node.outputs[0].name}'"


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.value]


class _Analysis:
    def __init__(self, model: ir.Model, shapes: Mapping[str, Shape],
                 shapes1: Mapping[str, Shape]):
        self.graph = model.graph
        self.shapes = shapes  # at batch 2: a merged batch axis cannot pass for a channel axis
        self.shapes1 = shapes1  # at batch 1, for MACs
        self.uf = _UnionFind()
        self.sizes: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.origins: list[str] = []
        self.axes: dict[ir.Value, ChannelAxis] = {}
        self.slices: list[ParamSlice] = []
        self.layers: list[ComputeLayer] = []
        self.rewrites: list[_Rewrite] = []
        self.fixed_here = False

    # -- groups ----------------------------------------------------------------------------
    def new_group(self, size: int, origin: str, reason: str | None = None) -> int:
        gid = self.uf.add()
        self.sizes.append(size)
        self.origins.append(origin)
        if reason is not None:
            self.reasons.setdefault(gid, []).append(reason)
        return gid

    def fix(self, layout: Layout | None, reason: str) -> None:
        self.fixed_here = True
        for seg in layout or ():
            self.reasons.setdefault(self.uf.find(seg.group), []).append(reason)

    def size(self, group: int) -> int:
        return self.sizes[self.uf.find(group)]

    def length(self, layout: Layout) -> int:
        return sum(self.size(s.group) * s.block for s in layout)

    def unify(self, a: ChannelAxis, b: ChannelAxis, node: ir.Node) -> None:
        same = (
            a.axis == b.axis
            and len(a.layout) == len(b.layout)
            and all(x.block == y.block and self.size(x.group) == self.size(y.group)
                    for x, y in zip(a.layout, b.layout, strict=True))
        )
        if not same:
            reason = f"{_label(node)} joins channels laid out differently"
            self.fix(a.layout, reason)
            self.fix(b.layout, reason)
            return
        for x, y in zip(a.layout, b.layout, strict=True):
            ra, rb = self.uf.find(x.group), self.uf.find(y.group)
            if ra == rb:
                continue
            root = self.uf.union(ra, rb)
            other = rb if root == ra else ra
            if other in self.reasons:
                self.reasons.setdefault(root, []).extend(self.reasons.pop(other))

    # -- helpers ---------------------------------------------------------------------------
    def shape(self, value: ir.Value | None) -> Shape | None:
        return None if value is None else self.shapes.get(value.name)

    def is_param(self, value: ir.Value | None) -> bool:
        return (value is not None and value.const_value is not None
                and not value.is_graph_input())

    def param_slice(self, value: ir.Value, axis: int, layout: Layout, role: str, kind: str,
                    node: ir.Node) -> None:
        self.slices.append(ParamSlice(value, axis, layout, role, kind, node))

    def channel_input(self, node: ir.Node, value: ir.Value, axis: int) -> Layout | None:
        """The layout of ``value`` if its channels sit on ``axis`` (negative); else fix them."""
        ca = self.axes.get(value)
        if ca is None:
            return None
        if ca.axis != axis:
            self.fix(ca.layout, f"{_label(node)} reads the channels on another axis")
            return None
        return ca.layout

    # -- walk ------------------------------------------------------------------------------
    def run(self) -> None:
        # Model inputs carry no layout (which axis is "channels" is unknown there): whatever
        # joins them is fixed, what merely reads them (the first layer) is unaffected.
        for node in self.graph:
            self.visit(node)
        for value in self.graph.outputs:
            ca = self.axes.get(value)
            if ca is not None:
                self.fix(ca.layout, f"reaches model output '{value.name}'")
        self.check_params()

    def visit(self, node: ir.Node) -> None:
        carried = [self.axes[v] for v in node.inputs if v is not None and v in self.axes]
        carried += self.captured(node)
        self.fixed_here = False  # a handler that fixes groups gives its own, better reason
        if node.domain not in DEFAULT_DOMAINS:
            outputs, free = None, False
        else:
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                handler = self.generic_handler(node.op_type)
            outputs, free = (None, False) if handler is None else handler(node)
        free = free or self.fixed_here
        if outputs is None:
            outputs = [None] * len(node.outputs)
            if carried and not free:
                why = f"consumed by {_label(node)}, an op the analysis does not model"
                if handler is not None:
                    why = f"consumed by {_label(node)} in a way the analysis does not model"
                for ca in carried:
                    self.fix(ca.layout, why)
                return
        for value, ca in zip(node.outputs, outputs, strict=True):
            if ca is not None:
                shape = self.shape(value)
                if shape is None or len(shape) < -ca.axis or shape[ca.axis] != self.length(
                        ca.layout):
                    self.fix(ca.layout, f"shape of '{value.name}' unknown or inconsistent")
                self.axes[value] = ca
            elif carried and not free and (value.uses() or value.is_graph_output()):
                for c in carried:
                    self.fix(c.layout, f"output '{value.name}' of {_label(node)} depends on "
                             "the channels in a way the analysis does not model")

    def captured(self, node: ir.Node) -> list[ChannelAxis]:
        """Channel tensors a subgraph of ``node`` (If, Loop, Scan) reads from the outer scope."""
        found: list[ChannelAxis] = []
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                graphs = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                graphs = list(attr.value)
            else:
                continue
            for sub in graphs:
                for inner in sub.all_nodes():
                    found += [self.axes[v] for v in inner.inputs if v is not None and v in self.axes]
        return found

    def generic_handler(self, op: str):
        if op in UNARY:
            return self.elementwise
        if op in BINARY:
            return self.elementwise
        if op in POOL:
            return self.pool
        if op in REDUCE:
            return self.reduce
        if op in RESHAPE:
            return self.reshape
        if op in PER_CHANNEL_NORM:
            return self.per_channel_norm
        if op in SOFTMAX:
            return self.softmax
        return None

    # -- element-wise ----------------------------------------------------------------------
    def elementwise(self, node: ir.Node):
        inputs = [v for v in node.inputs if v is not None]
        if node.op_type == "Clip" or node.op_type == "Dropout":
            inputs = inputs[:1]  # min/max and ratio/training are scalars
        carriers = [(v, self.axes[v]) for v in inputs if v in self.axes]
        if not carriers:
            return None, True
        ref = carriers[0][1]
        for _, ca in carriers[1:]:
            self.unify(ref, ca, node)
        for value in inputs:
            if value in self.axes:
                continue
            shape = self.shape(value)
            if shape is None:
                self.fix(ref.layout, f"shape of '{value.name}' in {_label(node)} unknown")
                continue
            size = shape[ref.axis] if len(shape) >= -ref.axis else 1
            if size == 1:
                continue  # broadcast over channels
            if self.is_param(value) and size == self.length(ref.layout):
                array = constant_array(value)
                if array.dtype.kind != "f":
                    self.fix(ref.layout, f"per-channel constant '{value.name}' is not float")
                    continue
                self.param_slice(value, len(shape) + ref.axis, ref.layout, "produce", "param",
                                 node)
            elif value.is_graph_input():
                self.fix(ref.layout, f"{_label(node)} joins them with model input '{value.name}'")
            else:
                self.fix(ref.layout, f"{_label(node)} joins them with '{value.name}', whose "
                         "channels have no known origin")
        outputs = [ref] + [None] * (len(node.outputs) - 1)
        return outputs, False

    def pool(self, node: ir.Node):
        x = node.inputs[0]
        shape = self.shape(x)
        if shape is None or x not in self.axes:
            return None, x not in self.axes
        layout = self.channel_input(node, x, 1 - len(shape))
        if layout is None:
            return None, False
        return [ChannelAxis(1 - len(shape), layout)] + [None] * (len(node.outputs) - 1), False

    def per_channel_norm(self, node: ir.Node):
        outputs, _ = self.pool(node)
        if outputs is None:
            return None, False
        layout = outputs[0].layout
        for value in node.inputs[1:5]:
            if value is None:
                continue
            if not self.is_param(value):
                self.fix(layout, f"{_label(node)} has a non-constant parameter")
                return outputs, False
            self.param_slice(value, 0, layout, "produce", "param", node)
        return outputs, False

    def tracked_input(self, node: ir.Node) -> tuple[ChannelAxis | None, int | None]:
        """The channel axis node's first input carries (None: not tracked, the node passes
        through) and that input's rank (None: unknown shape, which ends the tracking)."""
        x = node.inputs[0]
        shape = self.shape(x)
        return self.axes.get(x), None if shape is None else len(shape)

    def softmax(self, node: ir.Node):
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        axis = _attr_int(node, "axis", -1)
        axis = axis - rank if axis >= 0 else axis
        if axis == ca.axis:
            self.fix(ca.layout, f"{_label(node)} normalises across the channels")
        return [ca], False

    def op_LayerNormalization(self, node: ir.Node):
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        axis = _attr_int(node, "axis", -1)
        axis = axis - rank if axis >= 0 else axis
        if ca.axis >= axis:
            self.fix(ca.layout, f"{_label(node)} normalises across the channels")
        return [ca] + [None] * (len(node.outputs) - 1), False

    def reduce(self, node: ir.Node):
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        axes = _attr_ints(node, "axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            array = constant_array(node.inputs[1])
            if array is None:
                self.fix(ca.layout, f"{_label(node)} reduces over axes known only at run time")
                return [None], False
            axes = [int(a) for a in array.reshape(-1)]
        if not axes:
            if _attr_int(node, "noop_with_empty_axes", 0):
                return [ca], False
            axes = list(range(rank))
        axes = [a % rank for a in axes]
        channel = rank + ca.axis
        if channel in axes:
            self.fix(ca.layout, f"{_label(node)} reduces over the channels")
            return [None], False
        if _attr_int(node, "keepdims", 1):
            return [ca], False
        after = sum(1 for a in axes if a > channel)
        return [ChannelAxis(ca.axis + after, ca.layout)], False

    # -- shape ops -------------------------------------------------------------------------
    def reshape(self, node: ir.Node):
        x, out = node.inputs[0], node.outputs[0]
        ca = self.axes.get(x)
        if ca is None:
            return None, True
        in_shape, out_shape = self.shape(x), self.shape(out)
        if in_shape is None or out_shape is None:
            return None, False
        channel = len(in_shape) + ca.axis
        mapped = _map_reshape(in_shape, channel, out_shape)
        if mapped is None:
            self.fix(ca.layout, f"{_label(node)} splits or moves the channel axis")
            return None, False
        out_axis, factor = mapped
        layout = tuple(Segment(s.group, s.block * factor) for s in ca.layout)
        if node.op_type == "Reshape":
            target = constant_array(node.inputs[1])
            if target is None:
                self.fix(ca.layout, f"{_label(node)} has a target shape computed at run time")
                return None, False
            entry = int(target.reshape(-1)[out_axis])
            allowzero = _attr_int(node, "allowzero", 0)
            if entry == 0 and not allowzero and out_axis == channel and factor == 1:
                pass  # copies the input's (new) channel count
            elif entry == out_shape[out_axis]:
                self.rewrites.append(_Rewrite("reshape", node, (layout,), out_axis))
            elif entry != -1:
                self.fix(ca.layout, f"{_label(node)} target shape entry {entry} is not the "
                         "channel count")
                return None, False
        return [ChannelAxis(out_axis - len(out_shape), layout)], False

    def op_Transpose(self, node: ir.Node):
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        perm = _attr_ints(node, "perm") or list(range(rank))[::-1]
        position = perm.index(rank + ca.axis)
        return [ChannelAxis(position - rank, ca.layout)], False

    def op_Concat(self, node: ir.Node):
        out = node.outputs[0]
        shape = self.shape(out)
        inputs = list(node.inputs)
        carriers = [self.axes[v] for v in inputs if v is not None and v in self.axes]
        if not carriers:
            return None, True
        if shape is None:
            return None, False
        rank = len(shape)
        axis = _attr_int(node, "axis", 0)
        axis = axis - rank if axis >= 0 else axis
        if any(ca.axis != carriers[0].axis for ca in carriers):
            for ca in carriers:
                self.fix(ca.layout, f"{_label(node)} joins channels on different axes")
            return None, False
        channel_axis = carriers[0].axis
        if axis != channel_axis:
            return self.elementwise(node)
        layout: list[Segment] = []
        for value in inputs:
            if value in self.axes:
                layout.extend(self.axes[value].layout)
                continue
            piece = self.shape(value)
            if piece is None:
                for ca in carriers:
                    self.fix(ca.layout, f"{_label(node)} has an input of unknown shape")
                return None, False
            gid = self.new_group(piece[axis], _label(node),
                                 f"part of {_label(node)} that is not a tracked channel")
            layout.append(Segment(gid))
        return [ChannelAxis(axis, tuple(layout))], False

    def op_Split(self, node: ir.Node):
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        axis = _attr_int(node, "axis", 0)
        axis = axis - rank if axis >= 0 else axis
        if axis != ca.axis:
            return [ca] * len(node.outputs), False
        out_shapes = [self.shape(v) for v in node.outputs]
        if any(s is None for s in out_shapes):
            return None, False
        if len(node.inputs) > 1 and node.inputs[1] is not None and constant_array(
                node.inputs[1]) is None:
            self.fix(ca.layout, f"{_label(node)} has split sizes computed at run time")
            return None, False
        # cut the layout where the outputs end; every cut must fall between groups
        bounds = np.cumsum([s[axis] for s in out_shapes]).tolist()
        layouts: list[Layout] = []
        current: list[Segment] = []
        offset = 0
        for seg in ca.layout:
            current.append(seg)
            offset += self.size(seg.group) * seg.block
            if bounds and offset == bounds[0]:
                layouts.append(tuple(current))
                current = []
                bounds.pop(0)
            elif bounds and offset > bounds[0]:
                self.fix(ca.layout, f"{_label(node)} cuts through a channel group")
                return None, False
        if len(layouts) != len(node.outputs):
            self.fix(ca.layout, f"{_label(node)} cuts through a channel group")
            return None, False
        self.rewrites.append(_Rewrite("split", node, tuple(layouts)))
        return [ChannelAxis(axis, lay) for lay in layouts], False

    def op_Slice(self, node: ir.Node):
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        axes = None
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            array = constant_array(node.inputs[3])
            if array is None:
                self.fix(ca.layout, f"{_label(node)} slices axes known only at run time")
                return None, False
            axes = [int(a) % rank for a in array.reshape(-1)]
        else:
            starts = self.shape(node.inputs[1])
            axes = list(range(starts[0])) if starts else None
        if axes is None or rank + ca.axis in axes:
            self.fix(ca.layout, f"{_label(node)} slices the channel axis")
            return None, False
        return [ca], False

    def op_Shape(self, node: ir.Node):
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        start = _attr_int(node, "start", 0)
        end = _attr_int(node, "end", rank)
        start, end = (start % rank if start < 0 else start), (end % rank if end < 0 else end)
        if start <= rank + ca.axis < min(end, rank):
            self.fix(ca.layout, f"{_label(node)} reads the channel count")
            return None, False
        return None, True

    # -- layers ----------------------------------------------------------------------------
    def weight_reason(self, node: ir.Node) -> str | None:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not self.is_param(weight):
            return f"{_label(node)} weight is not a constant"
        if constant_array(weight).dtype.kind != "f":
            return f"{_label(node)} weight is not float"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and not self.is_param(bias):
            return f"{_label(node)} bias is not a constant"
        return None

    def blocked_layer(self, node: ir.Node, kind: str, out_size: int, reason: str,
                      out_axis: int, macs: int, weight_shape: Shape):
        """A layer whose channels cannot change: its input groups and a new output group are
        fixed with ``reason``."""
        for value in node.inputs[:1]:
            if value in self.axes:
                self.fix(self.axes[value].layout, reason)
        gid = self.new_group(out_size, _label(node), reason)
        layout = (Segment(gid),)
        self.layers.append(ComputeLayer(node, kind, macs, None, layout, weight_shape))
        return [ChannelAxis(out_axis, layout)], False

    def op_Conv(self, node: ir.Node):
        x, out = node.inputs[0], node.outputs[0]
        in_shape, out_shape = self.shape(x), self.shapes1.get(out.name)
        weight_shape = self.shape(node.inputs[1]) if len(node.inputs) > 1 else None
        if in_shape is None or out_shape is None or weight_shape is None:
            return None, False
        macs = math.prod(out_shape) * math.prod(weight_shape[1:])
        out_axis = 1 - len(out_shape)
        m = weight_shape[0]
        reason = self.weight_reason(node)
        if reason is not None:
            return self.blocked_layer(node, "conv", m, reason, out_axis, macs, weight_shape)
        group = _attr_int(node, "group", 1)
        in_layout = self.channel_input(node, x, 1 - len(in_shape))
        weight, bias = node.inputs[1], (node.inputs[2] if len(node.inputs) > 2 else None)
        if group == 1:
            gid = self.new_group(m, _label(node))
            out_layout = (Segment(gid),)
            self.param_slice(weight, 0, out_layout, "produce", "weight", node)
            if bias is not None:
                self.param_slice(bias, 0, out_layout, "produce", "bias", node)
            if in_layout is not None:
                self.param_slice(weight, 1, in_layout, "consume", "weight", node)
            self.layers.append(ComputeLayer(node, "conv", macs, in_layout, out_layout,
                                            weight_shape))
            return [ChannelAxis(out_axis, out_layout)], False
        if group == in_shape[1] and weight_shape[1] == 1 and m % group == 0:
            if in_layout is None:
                return self.blocked_layer(node, "depthwise", m,
                                          f"{_label(node)} reads channels of unknown origin",
                                          out_axis, macs, weight_shape)
            multiplier = m // group
            out_layout = tuple(Segment(s.group, s.block * multiplier) for s in in_layout)
            self.param_slice(weight, 0, out_layout, "produce", "weight", node)
            if bias is not None:
                self.param_slice(bias, 0, out_layout, "produce", "bias", node)
            self.rewrites.append(_Rewrite("group", node, (in_layout,)))
            self.layers.append(ComputeLayer(node, "depthwise", macs, in_layout, out_layout,
                                            weight_shape))
            return [ChannelAxis(out_axis, out_layout)], False
        reason = f"{_label(node)} is a grouped conv (group={group}): channels are coupled in blocks"
        return self.blocked_layer(node, "grouped", m, reason, out_axis, macs, weight_shape)

    def op_ConvTranspose(self, node: ir.Node):
        x, out = node.inputs[0], node.outputs[0]
        in_shape, out_shape = self.shape(x), self.shapes1.get(out.name)
        weight_shape = self.shape(node.inputs[1]) if len(node.inputs) > 1 else None
        x1 = self.shapes1.get(x.name)
        if in_shape is None or out_shape is None or weight_shape is None or x1 is None:
            return None, False
        macs = math.prod(x1) * math.prod(weight_shape[1:])
        out_axis = 1 - len(out_shape)
        group = _attr_int(node, "group", 1)
        m = weight_shape[1] * group
        reason = self.weight_reason(node)
        if reason is None and group != 1:
            reason = f"{_label(node)} is a grouped transposed conv (group={group})"
        if reason is not None:
            return self.blocked_layer(node, "conv_transpose", m, reason, out_axis, macs,
                                      weight_shape)
        in_layout = self.channel_input(node, x, 1 - len(in_shape))
        weight, bias = node.inputs[1], (node.inputs[2] if len(node.inputs) > 2 else None)
        gid = self.new_group(m, _label(node))
        out_layout = (Segment(gid),)
        self.param_slice(weight, 1, out_layout, "produce", "weight", node)
        if bias is not None:
            self.param_slice(bias, 0, out_layout, "produce", "bias", node)
        if in_layout is not None:
            self.param_slice(weight, 0, in_layout, "consume", "weight", node)
        self.layers.append(ComputeLayer(node, "conv_transpose", macs, in_layout, out_layout,
                                        weight_shape))
        return [ChannelAxis(out_axis, out_layout)], False

    def op_Gemm(self, node: ir.Node):
        a, out = node.inputs[0], node.outputs[0]
        a_shape, out_shape = self.shapes1.get(a.name), self.shapes1.get(out.name)
        weight_shape = self.shape(node.inputs[1])
        if a_shape is None or out_shape is None or weight_shape is None:
            return None, False
        trans_b = _attr_int(node, "transB", 0)
        n = weight_shape[0] if trans_b else weight_shape[1]
        macs = math.prod(out_shape) * (weight_shape[1] if trans_b else weight_shape[0])
        reason = self.weight_reason(node)
        if reason is None and _attr_int(node, "transA", 0):
            reason = f"{_label(node)} has transA=1"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        bias_shape = self.shape(bias)
        if reason is None and bias is not None and bias_shape and math.prod(bias_shape) not in (
                1, n):
            reason = f"{_label(node)} bias of shape {bias_shape} is not per-output"
        if reason is not None:
            return self.blocked_layer(node, "gemm", n, reason, -1, macs, weight_shape)
        in_layout = self.channel_input(node, a, -1)
        weight = node.inputs[1]
        gid = self.new_group(n, _label(node))
        out_layout = (Segment(gid),)
        self.param_slice(weight, 0 if trans_b else 1, out_layout, "produce", "weight", node)
        if bias is not None and bias_shape and math.prod(bias_shape) == n and n > 1:
            self.param_slice(bias, len(bias_shape) - 1, out_layout, "produce", "bias", node)
        if in_layout is not None:
            self.param_slice(weight, 1 if trans_b else 0, in_layout, "consume", "weight", node)
        self.layers.append(ComputeLayer(node, "gemm", macs, in_layout, out_layout, weight_shape))
        return [ChannelAxis(-1, out_layout)], False

    def op_MatMul(self, node: ir.Node):
        a, b, out = node.inputs[0], node.inputs[1], node.outputs[0]
        a_shape, out_shape = self.shapes1.get(a.name), self.shapes1.get(out.name)
        b_shape = self.shape(b)
        if not self.is_param(b) or b_shape is None or len(b_shape) != 2:
            if self.is_param(b) or a in self.axes or b in self.axes:
                for value in (a, b):
                    if value in self.axes:
                        self.fix(self.axes[value].layout,
                                 f"{_label(node)} is not activation x constant 2-D weight")
            return None, False
        if a_shape is None or out_shape is None:
            return None, False
        macs = math.prod(out_shape) * a_shape[-1]
        reason = self.weight_reason(node)
        if reason is not None:
            return self.blocked_layer(node, "matmul", b_shape[1], reason, -1, macs, b_shape)
        in_layout = self.channel_input(node, a, -1)
        gid = self.new_group(b_shape[1], _label(node))
        out_layout = (Segment(gid),)
        self.param_slice(b, 1, out_layout, "produce", "weight", node)
        if in_layout is not None:
            self.param_slice(b, 0, in_layout, "consume", "weight", node)
        self.layers.append(ComputeLayer(node, "matmul", macs, in_layout, out_layout, b_shape))
        return [ChannelAxis(-1, out_layout)], False

    # -- parameters ------------------------------------------------------------------------
    def check_params(self) -> None:
        """A parameter may be sliced only if every use of it is one we recorded, all agreeing."""
        by_value: dict[ir.Value, list[ParamSlice]] = {}
        for s in self.slices:
            by_value.setdefault(s.value, []).append(s)
        for value, slices in by_value.items():
            users = {id(user) for user, _ in value.uses()}
            recorded = {id(s.node) for s in slices}
            per_axis: dict[int, set] = {}
            for s in slices:
                key = (s.role, tuple((self.uf.find(g.group), g.block) for g in s.layout))
                per_axis.setdefault(s.axis, set()).add(key)
            reason = None
            if value.is_graph_output():
                reason = f"parameter '{value.name}' is a model output"
            elif not users <= recorded:
                reason = f"parameter '{value.name}' is also used by other nodes"
            elif any(len(keys) > 1 for keys in per_axis.values()):
                reason = f"parameter '{value.name}' is shared by layers with other channels"
            if reason is not None:
                for s in slices:
                    self.fix(s.layout, reason)

    # -- result ----------------------------------------------------------------------------
    def resolve(self, layout: Layout | None) -> Layout | None:
        if layout is None:
            return None
        return tuple(Segment(self.uf.find(s.group), s.block) for s in layout)

    def result(self) -> DependencyGraph:
        groups: dict[int, ChannelGroup] = {}
        for gid in range(len(self.sizes)):
            root = self.uf.find(gid)
            if root not in groups:
                groups[root] = ChannelGroup(root, self.sizes[root], origin=self.origins[root])
        for root, reasons in self.reasons.items():
            groups[self.uf.find(root)].reasons.extend(reasons)
        axes = {v: ChannelAxis(ca.axis, self.resolve(ca.layout)) for v, ca in self.axes.items()}
        for value, ca in axes.items():
            for seg in dict.fromkeys(ca.layout):
                groups[seg.group].tensors.append(value.name)
        seen: set[tuple] = set()
        for s in self.slices:
            resolved = ParamSlice(s.value, s.axis, self.resolve(s.layout), s.role, s.kind, s.node)
            key = (id(s.value), s.axis, id(s.node))
            if key in seen:
                continue
            seen.add(key)
            for seg in dict.fromkeys(resolved.layout):
                groups[seg.group].slices.append(resolved)
        layers = [ComputeLayer(la.node, la.kind, la.macs, self.resolve(la.in_layout),
                               self.resolve(la.out_layout), la.weight_shape) for la in self.layers]
        rewrites = [_Rewrite(r.kind, r.node, tuple(self.resolve(lay) for lay in r.layouts),
                             r.index) for r in self.rewrites]
        for g in groups.values():
            if g.prunable and not any(s.role == "produce" and s.kind == "weight"
                                      for s in g.slices):
                g.reasons.append("no layer produces these channels")
        return DependencyGraph(groups, axes, layers, rewrites)


def _map_reshape(in_shape: Shape, channel: int, out_shape: Shape) -> tuple[int, int] | None:
    """Where the channel axis lands in a reshape, and how many trailing entries each channel
    becomes (Flatten: H*W), or None if the reshape splits it or mixes it with leading axes."""
    before = math.prod(in_shape[:channel])
    for out_axis in range(len(out_shape)):
        if math.prod(out_shape[:out_axis]) != before:
            continue
        merged = in_shape[channel]
        for k in range(channel + 1, len(in_shape) + 1):
            if merged == out_shape[out_axis]:
                return out_axis, merged // in_shape[channel]
            if k == len(in_shape):
                break
            merged *= in_shape[k]
    return None


def analyze(model: ir.Model, shapes: Mapping[str, Shape] | None = None,
            shapes_batch1: Mapping[str, Shape] | None = None) -> DependencyGraph:
    """The channel groups of ``model``'s main graph.

    ``shapes`` are static shapes at batch 2 (so that a reshape folding the batch into the
    channels cannot pass for a flatten); ``shapes_batch1`` (for MACs) at batch 1. Both are
    inferred when not given.
    """
    if shapes is None or shapes_batch1 is None:
        proto = ir.serde.serialize_model(model)
        shapes = shapes if shapes is not None else static_shapes(proto, batch=2)[0]
        shapes_batch1 = (shapes_batch1 if shapes_batch1 is not None
                         else static_shapes(proto, batch=1)[0])
    analysis = _Analysis(model, shapes, shapes_batch1)
    analysis.run()
    return analysis.result()


# ------------------------------------------------------------------------------ transforms


@dataclass(frozen=True)
class ChannelTransform:
    """How one group's n channels become k: new channel i on the producing side is
    ``sum_j produce[i, j] * old_j``; a consumer's new input column i is
    ``sum_j consume[i, j] * old column j``.

    Pruning keeps rows of the identity for both; merging a cluster averages its members'
    producing slices (rows summing to 1) and adds up their consumer columns (rows of ones).
    """

    produce: np.ndarray  # (k, n)
    consume: np.ndarray  # (k, n)

    @property
    def kept(self) -> int:
        return self.produce.shape[0]

    @property
    def size(self) -> int:
        return self.produce.shape[1]

    @classmethod
    def keep(cls, n: int, indices: Iterable[int]) -> ChannelTransform:
        """Keep the channels ``indices`` (in their original order), drop the rest."""
        rows = np.eye(n)[sorted(int(i) for i in indices)]
        return cls(rows, rows.copy())

    @classmethod
    def merge(cls, n: int, clusters: Sequence[Sequence[int]],
              weights: np.ndarray | None = None,
              scales: np.ndarray | None = None) -> ChannelTransform:
        """One channel per cluster: the weighted average (``weights``, default uniform) of
        its members on the producing side, the sum (each member's column times ``scales``,
        default 1) on the consuming side."""
        weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        scales = np.ones(n) if scales is None else np.asarray(scales, dtype=np.float64)
        produce = np.zeros((len(clusters), n))
        consume = np.zeros((len(clusters), n))
        for i, members in enumerate(clusters):
            members = list(members)
            w = weights[members]
            w = w / w.sum() if w.sum() > 0 else np.full(len(members), 1.0 / len(members))
            produce[i, members] = w
            consume[i, members] = scales[members]
        return cls(produce, consume)


def _transform_axis(array: np.ndarray, axis: int, layout: Layout,
                    transforms: Mapping[int, ChannelTransform], role: str,
                    sizes: Mapping[int, int]) -> np.ndarray:
    pieces = []
    offset = 0
    for seg in layout:
        n = sizes[seg.group]
        length = n * seg.block
        part = np.take(array, np.arange(offset, offset + length), axis=axis)
        offset += length
        t = transforms.get(seg.group)
        if t is not None:
            matrix = t.produce if role == "produce" else t.consume
            moved = np.moveaxis(part, axis, 0)
            rest = moved.shape[1:]
            blocks = moved.reshape(n, seg.block, -1).astype(np.float64)
            blocks = np.einsum("kn,nbr->kbr", matrix, blocks)
            part = np.moveaxis(blocks.reshape(t.kept * seg.block, *rest), 0, axis)
        pieces.append(part)
    if offset != array.shape[axis]:
        raise UnsupportedModelError(
            f"parameter axis {axis} of length {array.shape[axis]} does not match its channel "
            f"layout ({offset})")
    return np.concatenate(pieces, axis=axis)


def shrink(model: ir.Model, graph: DependencyGraph,
           transforms: Mapping[int, ChannelTransform]) -> None:
    """Apply one transform per group, in place, to every coupled parameter, every channel
    count in attributes and shape constants, and every tensor's recorded shape."""
    transforms = {g: t for g, t in transforms.items() if t is not None}
    for gid, t in transforms.items():
        group = graph.groups[gid]
        if not group.prunable:
            raise UnsupportedModelError(f"group {gid} cannot change: {group.reason}")
        if t.size != group.size or t.kept < 1:
            raise UnsupportedModelError(
                f"transform of group {gid} maps {t.size} -> {t.kept}, group has {group.size}")
    sizes = {gid: g.size for gid, g in graph.groups.items()}
    new_sizes = dict(sizes)
    new_sizes.update({gid: t.kept for gid, t in transforms.items()})

    # every (value, axis) once: a weight is sliced on its output and its input axis
    todo: dict[ir.Value, dict[int, ParamSlice]] = {}
    for gid in transforms:
        for s in graph.groups[gid].slices:
            todo.setdefault(s.value, {})[s.axis] = s
    for value, by_axis in todo.items():
        original = value.const_value.numpy()
        array = np.asarray(original)
        for axis, s in sorted(by_axis.items()):
            array = _transform_axis(array, axis, s.layout, transforms, s.role, sizes)
        array = np.ascontiguousarray(array.astype(original.dtype))
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)

    names = NameScope(model.graph)
    touched = set(transforms)
    for value, ca in graph.axes.items():
        if not any(s.group in touched for s in ca.layout) or value.shape is None:
            continue
        dims = list(value.shape.dims)
        if len(dims) >= -ca.axis:
            dims[ca.axis] = graph.length(ca.layout, new_sizes)
            value.shape = ir.Shape(dims)

    for rewrite in graph.rewrites:
        if not any(s.group in touched for lay in rewrite.layouts for s in lay):
            continue
        node = rewrite.node
        if rewrite.kind == "group":
            node.attributes["group"] = ir.AttrInt64("group",
                                                    graph.length(rewrite.layouts[0], new_sizes))
        elif rewrite.kind == "reshape":
            target = constant_array(node.inputs[1]).copy()
            flat = target.reshape(-1)
            flat[rewrite.index] = graph.length(rewrite.layouts[0], new_sizes)
            name = names(f"{node.inputs[1].name}_shrunk")
            new = ir.Value(name=name, shape=ir.Shape(target.shape),
                           const_value=ir.tensor(target, name=name))
            new.dtype = new.const_value.dtype
            node.graph.register_initializer(new)
            node.replace_input_with(1, new)
        elif rewrite.kind == "split":
            split = np.array([graph.length(lay, new_sizes) for lay in rewrite.layouts],
                             dtype=np.int64)
            name = names(f"{node.name or 'split'}_sizes")
            new = ir.Value(name=name, shape=ir.Shape(split.shape),
                           const_value=ir.tensor(split, name=name))
            new.dtype = new.const_value.dtype
            node.graph.register_initializer(new)
            if len(node.inputs) > 1:
                node.replace_input_with(1, new)
            else:
                node.resize_inputs(2)
                node.replace_input_with(1, new)
            if "num_outputs" in node.attributes:
                del node.attributes["num_outputs"]
