"""Channel dependencies on the ONNX graph: which tensors' channels are coupled and must shrink
together, and the one function that shrinks them.

Like Torch-Pruning's dependency graph, but on ONNX and apart from any criterion or pass: the
analysis walks the graph once and sorts every channel into a **group** (one mask for all
coupled tensors). A Conv, Gemm or MatMul with a constant weight starts a group (its output
channels); element-wise ops, BatchNormalization, LayerNormalization, pooling, Pad, Resize and
residual Add/Sub/Mul pass it on or join groups; Concat lays groups side by side; Split and Slice
on the channel axis cut them (a cut inside a group splits it into two groups, which are then
pruned apart: a YOLO-style Split of a conv's output into halves); a depthwise Conv carries its
input's groups (``block`` = channel multiplier); Flatten/Reshape into a Gemm turns each channel
into a block of ``H*W`` features, and a Reshape that splits the channels into attention heads
([N, T, heads*dim] -> [N, T, heads, dim]) coarsens the group to whole heads, which the batched
MatMuls of attention then couple across Q, K and V. A tensor's channel axis is described by a
**layout**: the groups along it, in order, each with its block size.

Every parameter that follows a channel (producer weights' output rows, biases, BatchNorm
statistics, LayerNorm scale and bias, per-channel constants, depthwise filters) is a ``produce``
slice; every weight that reduces over channels (a consumer's input columns) is a ``consume``
slice. ``shrink`` applies a ``ChannelTransform`` per group to all of them at once: pruning keeps
rows, merging averages ``produce`` slices and sums ``consume`` slices. A constant that several
nodes share in different ways (exporters deduplicate equal initializers, such as zero biases)
is given to each of them as its own copy.

A group is left alone (``reasons`` says why) when it reaches a model input or output, an op the
analysis does not model, a grouped conv, a cut through a flattened channel's features, a
channel count computed at run time, or a parameter used inconsistently by one node: never a
silently wrong graph. Removing channels under a LayerNormalization over the channel axis
changes its statistics (the remaining channels are normalised alone): like the loss of the
removed channels themselves, that is for the criterion and the refit to weigh.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
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
# Ops the analysis evaluates when all their inputs are constants, to read shape-like values
# (pads, slice bounds, reshape targets) that an exporter computes from constants and the
# cleanup's constant folding leaves (it preserves ConstantOfShape, for one).
STATIC_OPS = frozenset({
    "Constant", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Gather",
    "Unsqueeze", "Squeeze", "Flatten", "Mul", "Add", "Sub", "Div", "Neg", "Abs", "Range",
    "Expand", "Identity", "Floor", "Ceil", "Max", "Min", "Equal", "Where", "Tile",
})
STATIC_LIMIT = 4096  # elements: shape-like values only, never weights


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
    # conv | depthwise | grouped | conv_transpose | gemm | matmul | batched_matmul (two
    # activations, e.g. attention scores: no weight, MACs follow the output's channels)
    kind: str
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
    """An attribute or shape constant that depends on a channel count.

    ``group``: a depthwise conv's group attribute (the length of ``layouts[0]``). ``split``:
    a Split's sizes (one layout per output). ``entry``: entry ``index`` of the constant input
    ``input`` of ``node`` becomes the length of ``layouts[0]`` (a Reshape target's channel
    count, a piece of the Concat that builds one, a Slice's start or end, a Resize's size);
    ``array`` is that input's value when the analysis computed it (not an initializer).
    """

    kind: str  # group | split | entry
    node: ir.Node
    layouts: tuple[Layout, ...]
    index: int = 0
    input: int = 1
    array: np.ndarray | None = None


@dataclass
class DependencyGraph:
    """The result of ``analyze``: groups, tensors' channel axes, compute layers, rewrites."""

    groups: dict[int, ChannelGroup]
    axes: dict[ir.Value, ChannelAxis]
    layers: list[ComputeLayer]
    rewrites: list[_Rewrite]
    private: frozenset[ir.Value] = frozenset()  # parameters each user gets its own copy of

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


def _attr_floats(node: ir.Node, name: str) -> list[float] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [float(v) for v in attr.value]


class _Analysis:
    def __init__(self, model: ir.Model, shapes: Mapping[str, Shape],
                 shapes1: Mapping[str, Shape]):
        self.graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.shapes = shapes  # at batch 2: a merged batch axis cannot pass for a channel axis
        self.shapes1 = shapes1  # at batch 1, for MACs
        self.uf = _UnionFind()
        self.sizes: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.origins: list[str] = []
        # A group refined after it was created (split by a cut, coarsened to whole heads) is
        # replaced by its parts: (part, block multiplier), in order. Layouts recorded before
        # stay valid and are expanded to the parts wherever they are read.
        self.parts: dict[int, list[tuple[int, int]]] = {}
        self.spans: dict[int, tuple[str, int]] = {}  # a split part: its origin, first channel
        self.axes: dict[ir.Value, ChannelAxis] = {}
        self.slices: list[ParamSlice] = []
        self.layers: list[ComputeLayer] = []
        self.rewrites: list[_Rewrite] = []
        self.private: set[ir.Value] = set()
        self.statics: dict[ir.Value, np.ndarray | None] = {}
        self.fixed_here = False

    # -- groups ----------------------------------------------------------------------------
    def new_group(self, size: int, origin: str, reason: str | None = None) -> int:
        gid = self.uf.add()
        self.sizes.append(size)
        self.origins.append(origin)
        if reason is not None:
            self.reasons.setdefault(gid, []).append(reason)
        return gid

    def expand(self, layout: Layout) -> Layout:
        """``layout`` in terms of the current groups (roots that were not refined)."""
        out: list[Segment] = []
        stack = list(reversed(layout))
        while stack:
            seg = stack.pop()
            root = self.uf.find(seg.group)
            parts = self.parts.get(root)
            if parts is None:
                out.append(Segment(root, seg.block))
            else:
                stack.extend(Segment(p, seg.block * m) for p, m in reversed(parts))
        return tuple(out)

    def refine(self, group: int, parts: list[tuple[int, int]], origins: list[str]) -> None:
        """Replace ``group`` by ``parts`` (sizes, block multipliers); its reasons pass to
        them in ``result``."""
        self.parts[self.uf.find(group)] = [
            (self.new_group(size, origin), multiplier)
            for (size, multiplier), origin in zip(parts, origins, strict=True)
        ]

    def split_group(self, group: int, at: int) -> None:
        """Cut ``group`` into its channels [0, at) and [at, n): every tensor and parameter
        carrying it is cut at the same channel, so the two parts may shrink apart."""
        root = self.uf.find(group)
        n = self.sizes[root]
        base, start = self.spans.get(root, (self.origins[root], 0))
        self.refine(root, [(at, 1), (n - at, 1)],
                    [f"{base} [{start}:{start + at}]", f"{base} [{start + at}:{start + n}]"])
        for (part, _), offset in zip(self.parts[root], (start, start + at), strict=True):
            self.spans[part] = (base, offset)

    def coarsen_group(self, group: int, factor: int) -> None:
        """Tie ``group``'s channels in consecutive blocks of ``factor`` (attention heads): one
        channel of the new group is ``factor`` of the old, kept or removed together."""
        root = self.uf.find(group)
        n, origin = self.sizes[root], self.origins[root]
        self.refine(root, [(n // factor, factor)], [f"{origin} in blocks of {factor}"])

    def fix(self, layout: Layout | None, reason: str) -> None:
        self.fixed_here = True
        for seg in self.expand(layout or ()):
            self.reasons.setdefault(seg.group, []).append(reason)

    def size(self, group: int) -> int:
        return self.sizes[self.uf.find(group)]

    def length(self, layout: Layout) -> int:
        return sum(self.size(s.group) * s.block for s in layout)

    def align(self, a: Layout, b: Layout) -> list[tuple[Segment, Segment]] | None:
        """Refine the groups of two layouts of the same axis until they pair up segment by
        segment (same size, same block), or None if they cannot."""
        while True:
            x_layout, y_layout = list(self.expand(a)), list(self.expand(b))
            if len(x_layout) == len(y_layout) and all(
                    x.block == y.block and self.size(x.group) == self.size(y.group)
                    for x, y in zip(x_layout, y_layout, strict=True)):
                return list(zip(x_layout, y_layout, strict=True))
            if self.length(x_layout) != self.length(y_layout):
                return None
            for x, y in zip(x_layout, y_layout, strict=False):
                if x.block != y.block:
                    fine, coarse = (x, y) if x.block < y.block else (y, x)
                    factor = coarse.block // fine.block
                    if coarse.block % fine.block or self.size(fine.group) % factor:
                        return None
                    self.coarsen_group(fine.group, factor)
                    break
                nx, ny = self.size(x.group), self.size(y.group)
                if nx != ny:
                    big, small = (x, ny) if nx > ny else (y, nx)
                    self.split_group(big.group, small)
                    break
            else:
                return None

    def cut(self, layout: Layout, bounds: Sequence[int]) -> list[Layout] | None:
        """The pieces of ``layout`` between entry offsets ``bounds`` (increasing, inside the
        axis), splitting the groups a bound falls in; None if a bound falls inside a block of
        one channel's entries (a flattened channel's features) or a piece would be empty."""
        bounds = list(bounds)
        if any(b <= a for a, b in zip([0, *bounds], [*bounds, self.length(layout)],
                                       strict=True)):
            return None
        for bound in bounds:
            while True:
                offset = 0
                for seg in self.expand(layout):
                    length = self.size(seg.group) * seg.block
                    if offset < bound < offset + length:
                        if (bound - offset) % seg.block:
                            return None
                        self.split_group(seg.group, (bound - offset) // seg.block)
                        break
                    offset += length
                else:
                    break
        pieces: list[list[Segment]] = [[]]
        offset, remaining = 0, list(bounds)
        for seg in self.expand(layout):
            if remaining and offset == remaining[0]:
                pieces.append([])
                remaining.pop(0)
            pieces[-1].append(seg)
            offset += self.size(seg.group) * seg.block
        return [tuple(p) for p in pieces]

    def coarse_layout(self, layout: Layout, factor: int) -> Layout | None:
        """``layout`` with every entry standing for ``factor`` of the old (a Reshape that
        splits the axis into [.., n / factor, factor, ..]), coarsening groups where a block
        of ``factor`` entries spans several channels; None if a block spans two groups."""
        while True:
            out, offset = [], 0
            for seg in self.expand(layout):
                n = self.size(seg.group)
                if offset % factor:
                    return None
                if seg.block % factor == 0:
                    out.append(Segment(seg.group, seg.block // factor))
                elif factor % seg.block == 0 and n % (factor // seg.block) == 0:
                    self.coarsen_group(seg.group, factor // seg.block)
                    break
                else:
                    return None
                offset += n * seg.block
            else:
                return tuple(out)

    def unify(self, a: ChannelAxis, b: ChannelAxis, node: ir.Node) -> None:
        pairs = self.align(a.layout, b.layout) if a.axis == b.axis else None
        if pairs is None:
            reason = f"{_label(node)} joins channels laid out differently"
            self.fix(a.layout, reason)
            self.fix(b.layout, reason)
            return
        for x, y in pairs:
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

    def static(self, value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
        """The value's content if it is a constant or computed from constants only by small
        shape-like ops (evaluated with onnx's reference evaluator), else None."""
        if value is None:
            return None
        if value in self.statics:
            return self.statics[value]
        shape = self.shape(value)
        if value in self.axes or (shape is not None and math.prod(shape) > STATIC_LIMIT):
            return None  # channels or anything as large are activations, not shapes
        result = constant_array(value) if not value.is_graph_input() else None
        node = value.producer()
        if result is None and depth < 32 and node is not None and node.op_type in STATIC_OPS \
                and node.domain in DEFAULT_DOMAINS and not any(
                    a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                    for a in node.attributes.values()):
            arrays = []
            for v in node.inputs:
                arrays.append(self.static(v, depth + 1))
                if v is not None and arrays[-1] is None:
                    break
            else:
                if sum(a.size for a in arrays if a is not None) <= STATIC_LIMIT:
                    result = _evaluate(node, arrays, self.opset, node.outputs.index(value))
                if result is not None and result.size > STATIC_LIMIT:
                    result = None
        self.statics[value] = result
        return result

    def entries(self, value: ir.Value) -> list[tuple[int | None, ir.Node | None, int, int,
                                                     np.ndarray | None]] | None:
        """The entries of a 1-D shape-like input: (value or None if computed at run time,
        node and input holding it, index there, that input's value). A Concat of pieces
        (an exporter's [batch, seq, heads, dim] from Shape ops and constants) is followed to
        its pieces, so the constant ones can be rewritten while the others stay."""
        array = self.static(value)
        if array is not None:
            flat = array.reshape(-1)
            return [(int(v), None, 0, i, flat) for i, v in enumerate(flat)]
        node = value.producer()
        if node is None or node.op_type != "Concat" or node.domain not in DEFAULT_DOMAINS:
            return None
        out: list = []
        for index, piece in enumerate(node.inputs):
            shape = self.shape(piece)
            if shape is None or len(shape) != 1:
                return None
            array = self.static(piece)
            if array is None:
                out += [(None, None, 0, 0, None)] * shape[0]
            else:
                flat = array.reshape(-1)
                out += [(int(v), node, index, i, flat) for i, v in enumerate(flat)]
        return out

    def entry_rewrite(self, node: ir.Node, input_index: int, entry: tuple, layout: Layout
                      ) -> None:
        """Record that ``entry`` (from ``entries`` of ``node``'s input ``input_index``) must
        become the length of ``layout``."""
        _, holder, piece, index, array = entry
        if holder is None:
            holder, piece = node, input_index
        self.rewrites.append(_Rewrite("entry", holder, (layout,), index, piece, array))

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
        """Over the channel axis, the scale and bias follow the channels (see the module
        note on what removing channels does to the statistics); over later axes only,
        the channels pass through."""
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        axis = _attr_int(node, "axis", -1)
        axis = axis - rank if axis >= 0 else axis
        outputs = [ca] + [None] * (len(node.outputs) - 1)
        if ca.axis < axis:
            return outputs, False
        for value in node.inputs[1:3]:
            if value is None:
                continue
            shape = self.shape(value)
            if not self.is_param(value) or shape is None:
                self.fix(ca.layout, f"{_label(node)} has a non-constant scale or bias")
                return outputs, False
            if len(shape) < -ca.axis or shape[ca.axis] == 1:
                continue  # broadcast over the channels
            if shape[ca.axis] != self.length(ca.layout):
                self.fix(ca.layout, f"{_label(node)} scale or bias of shape {shape} does not "
                         "match the channels")
                return outputs, False
            self.param_slice(value, len(shape) + ca.axis, ca.layout, "produce", "param", node)
        return outputs, False

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
        split = None if mapped is not None or node.op_type != "Reshape" else _split_reshape(
            in_shape, channel, out_shape)
        if mapped is None and split is None:
            self.fix(ca.layout, f"{_label(node)} splits or moves the channel axis")
            return None, False
        if mapped is not None:
            # merged with the axes after it (Flatten: each channel becomes a block of H*W)
            out_axis, factor = mapped
            layout = tuple(Segment(s.group, s.block * factor) for s in ca.layout)
            pass_through = factor == 1 and out_axis == channel
        else:
            # split into [.., n / inner, inner, ..] (attention heads): whole blocks of
            # ``inner`` entries become one channel of the first axis
            out_axis, inner = split
            layout = self.coarse_layout(ca.layout, inner)
            if layout is None:
                self.fix(ca.layout, f"{_label(node)} splits the channels into blocks of "
                         f"{inner} that cross channel groups")
                return None, False
            pass_through = False
        if node.op_type == "Reshape" and not self.reshape_target(
                node, ca, channel, out_axis, pass_through, layout, out_shape):
            return None, False
        return [ChannelAxis(out_axis - len(out_shape), layout)], False

    def reshape_target(self, node: ir.Node, ca: ChannelAxis, channel: int, out_axis: int,
                       pass_through: bool, layout: Layout, out_shape: Shape) -> bool:
        """Check a Reshape's target shape against the channels it moves: the channel entry
        is the channel count (rewritten on shrinking), -1, or (``pass_through``: the axis
        stays as it is) a 0 copying it; no other entry copies the channel count. Other
        entries may be computed at run time (Shape ops fix any channels they read)."""
        entries = self.entries(node.inputs[1])
        if entries is None or len(entries) != len(out_shape):
            self.fix(ca.layout, f"{_label(node)} has a target shape computed at run time")
            return False
        allowzero = _attr_int(node, "allowzero", 0)
        for position, entry in enumerate(entries):
            value = entry[0]
            copies = value == 0 and not allowzero
            if position != out_axis:
                if copies and position == channel:
                    self.fix(ca.layout, f"{_label(node)} copies the channel count to another "
                             "axis")
                    return False
                continue
            if value is None:
                self.fix(ca.layout, f"{_label(node)} computes the channel count of its target "
                         "shape at run time")
                return False
            if copies and position == channel and pass_through:
                continue  # copies the input's (new) channel count
            if value == out_shape[out_axis] and not copies:
                self.entry_rewrite(node, 1, entry, layout)
            elif value != -1:
                self.fix(ca.layout, f"{_label(node)} target shape entry {value} is not the "
                         "channel count")
                return False
        return True

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
        if len(node.inputs) > 1 and node.inputs[1] is not None and self.static(
                node.inputs[1]) is None:
            self.fix(ca.layout, f"{_label(node)} has split sizes computed at run time")
            return None, False
        if any(s[axis] == 0 for s in out_shapes):
            self.fix(ca.layout, f"{_label(node)} has an empty output")
            return None, False
        # cut the layout where the outputs end, splitting the groups a cut falls in
        bounds = np.cumsum([s[axis] for s in out_shapes]).tolist()[:-1]
        layouts = self.cut(ca.layout, bounds)
        if layouts is None:
            self.fix(ca.layout, f"{_label(node)} cuts through the features of one channel")
            return None, False
        self.rewrites.append(_Rewrite("split", node, tuple(layouts)))
        return [ChannelAxis(axis, lay) for lay in layouts], False

    def op_Slice(self, node: ir.Node):
        """Off the channel axis the channels pass through. On it, with constant bounds and
        step 1, the output carries the sliced part of the layout (groups the bounds fall in
        are split) and the bounds are rewritten on shrinking."""
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        if self.opset < 10:
            axes = _attr_ints(node, "axes")
            if axes is None:
                axes = list(range(len(_attr_ints(node, "starts") or [])))
            axes = [a % rank for a in axes]
            if rank + ca.axis in axes:
                self.fix(ca.layout, f"{_label(node)} slices the channel axis with attribute "
                         "bounds (opset < 10)")
                return None, False
            return [ca], False
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            array = self.static(node.inputs[3])
            if array is None:
                self.fix(ca.layout, f"{_label(node)} slices axes known only at run time")
                return None, False
            axes = [int(a) % rank for a in array.reshape(-1)]
        else:
            starts = self.shape(node.inputs[1])
            if starts is None:
                self.fix(ca.layout, f"{_label(node)} slices axes known only at run time")
                return None, False
            axes = list(range(starts[0]))
        channel = rank + ca.axis
        if channel not in axes:
            return [ca], False
        position = axes.index(channel)
        starts, ends = self.static(node.inputs[1]), self.static(node.inputs[2])
        steps = self.static(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
        if starts is None or ends is None or (len(node.inputs) > 4 and node.inputs[4]
                                              and steps is None):
            self.fix(ca.layout, f"{_label(node)} slices the channels at bounds computed at "
                     "run time")
            return None, False
        step = 1 if steps is None else int(steps.reshape(-1)[position])
        if step != 1:
            self.fix(ca.layout, f"{_label(node)} slices the channels with step {step}")
            return None, False
        n = self.length(ca.layout)
        start, end = (int(a.reshape(-1)[position]) for a in (starts, ends))
        start, end = (min(max(v + n if v < 0 else v, 0), n) for v in (start, end))
        bounds = [b for b in (start, end) if 0 < b < n]
        pieces = self.cut(ca.layout, bounds) if end > start else None
        if pieces is None:
            self.fix(ca.layout, f"{_label(node)} cuts through the features of one channel")
            return None, False
        before = tuple(pieces[0]) if start > 0 else ()
        inside = pieces[1] if start > 0 else pieces[0]
        for index, layout in ((1, before), (2, before + inside)):
            entry = (None, None, 0, position, self.static(node.inputs[index]).reshape(-1))
            self.entry_rewrite(node, index, entry, layout)
        return [ChannelAxis(ca.axis, inside)], False

    def op_Pad(self, node: ir.Node):
        """Pads off the channel axis (any mode) pass the channels through."""
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        if self.opset < 11:
            pads = _attr_ints(node, "pads")
            pads = None if pads is None else np.asarray(pads)
        else:
            pads = self.static(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None:
            self.fix(ca.layout, f"{_label(node)} has pads computed at run time")
            return None, False
        axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            array = self.static(node.inputs[3])
            if array is None:
                self.fix(ca.layout, f"{_label(node)} pads axes known only at run time")
                return None, False
            axes = [int(a) % rank for a in array.reshape(-1)]
        pads = [int(p) for p in pads.reshape(-1)]
        channel = rank + ca.axis
        if len(pads) != 2 * len(axes):
            return None, False
        if channel in axes:
            i = axes.index(channel)
            if pads[i] or pads[i + len(axes)]:
                self.fix(ca.layout, f"{_label(node)} pads the channel axis")
                return None, False
        return [ca], False

    def op_Resize(self, node: ir.Node):
        """Channels pass through when the scale on their axis is 1 (its size, if sizes are
        given, is rewritten on shrinking)."""
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        channel = rank + ca.axis
        axes = _attr_ints(node, "axes")
        axes = list(range(rank)) if axes is None else [a % rank for a in axes]
        if channel not in axes:
            return [ca], False
        position = axes.index(channel)
        if node.attributes.get("coordinate_transformation_mode") is not None and \
                node.attributes["coordinate_transformation_mode"].value == "tf_crop_and_resize":
            self.fix(ca.layout, f"{_label(node)} crops with a region of interest")
            return None, False
        if self.opset < 11:
            scales_value, sizes_value = node.inputs[1], None
        else:
            scales_value = node.inputs[2] if len(node.inputs) > 2 else None
            sizes_value = node.inputs[3] if len(node.inputs) > 3 else None
        scales_shape = self.shape(scales_value)
        if scales_value is not None and scales_shape != (0,):
            scales = self.static(scales_value)
            if scales is None:
                self.fix(ca.layout, f"{_label(node)} has scales computed at run time")
                return None, False
            if float(scales.reshape(-1)[position]) != 1.0:
                self.fix(ca.layout, f"{_label(node)} resizes the channel axis")
                return None, False
            return [ca], False
        if sizes_value is None:
            return None, False
        policy = node.attributes.get("keep_aspect_ratio_policy")
        if policy is not None and policy.value != "stretch":
            self.fix(ca.layout, f"{_label(node)} keeps the aspect ratio across the channel "
                     "axis")
            return None, False
        entries = self.entries(sizes_value)
        if entries is None or len(entries) != len(axes) or entries[position][0] is None:
            self.fix(ca.layout, f"{_label(node)} has sizes computed at run time")
            return None, False
        if entries[position][0] != self.length(ca.layout):
            self.fix(ca.layout, f"{_label(node)} resizes the channel axis")
            return None, False
        self.entry_rewrite(node, 3, entries[position], ca.layout)
        return [ca], False

    def op_Upsample(self, node: ir.Node):
        ca, rank = self.tracked_input(node)
        if ca is None or rank is None:
            return None, ca is None
        scales = _attr_floats(node, "scales")
        if scales is None and len(node.inputs) > 1:
            array = self.static(node.inputs[1])
            scales = None if array is None else [float(v) for v in array.reshape(-1)]
        if scales is None or len(scales) != rank:
            self.fix(ca.layout, f"{_label(node)} has scales computed at run time")
            return None, False
        if scales[rank + ca.axis] != 1.0:
            self.fix(ca.layout, f"{_label(node)} resizes the channel axis")
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
        if not self.is_param(a) and not self.is_param(b):
            return self.batched_matmul(node)
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

    def batched_matmul(self, node: ir.Node):
        """A MatMul of two activations ([.., m, k] x [.., k, n], attention's Q K^T and A V):
        channels on a batch axis (heads) of both inputs are coupled and carried to the
        output, as are A's rows or B's columns; a sum over channels (k) is not modelled."""
        a, b, out = node.inputs[0], node.inputs[1], node.outputs[0]
        carriers = {i: self.axes[v] for i, v in enumerate((a, b)) if v in self.axes}
        if not carriers:
            return None, True
        shapes = [self.shape(a), self.shape(b)]
        a1, out1 = self.shapes1.get(a.name), self.shapes1.get(out.name)
        if any(s is None for s in shapes) or a1 is None or out1 is None:
            return None, False

        def refuse(reason: str):
            for ca in carriers.values():
                self.fix(ca.layout, reason)
            return None, False

        if any(len(s) < 2 for s in shapes):
            return refuse(f"{_label(node)} multiplies by a vector")
        kinds = {}
        for i, ca in carriers.items():
            if ca.axis == (-1 if i == 0 else -2):
                return refuse(f"{_label(node)} sums over the channels")
            kinds[i] = "batch" if ca.axis <= -3 else "rows" if i == 0 else "columns"
        if len(carriers) == 2:
            if kinds[0] != "batch" or kinds[1] != "batch":
                return refuse(f"{_label(node)} gives its output channels on two axes")
            self.unify(carriers[0], carriers[1], node)
        index, ref = next(iter(carriers.items()))
        if len(carriers) == 1 and kinds[index] == "batch":
            other = shapes[1 - index]
            if len(other) >= -ref.axis and other[ref.axis] != 1:
                name = (a, b)[1 - index].name
                return refuse(f"{_label(node)} joins them with '{name}', whose channels have "
                              "no known origin")
        macs = math.prod(out1) * a1[-1]
        self.layers.append(ComputeLayer(node, "batched_matmul", macs, None, ref.layout,
                                        tuple(self.shapes1.get(b.name, shapes[1]))))
        return [ChannelAxis(ref.axis, ref.layout)], False

    # -- parameters ------------------------------------------------------------------------
    def check_params(self) -> None:
        """A parameter is sliced where every node using it slices it one way. Shared by nodes
        that slice it differently, or also used by nodes that do not follow channels (an
        exporter deduplicates equal initializers, such as zero biases), it is made private:
        ``shrink`` gives each recorded node its own copy."""
        by_value: dict[ir.Value, list[ParamSlice]] = {}
        for s in self.slices:
            by_value.setdefault(s.value, []).append(s)
        for value, slices in by_value.items():
            users = {id(user) for user, _ in value.uses()}
            recorded = {id(s.node) for s in slices}
            per_axis: dict[int, set] = {}
            per_node_axis: dict[tuple[int, int], set] = {}
            for s in slices:
                key = (s.role, self.expand(s.layout))
                per_axis.setdefault(s.axis, set()).add(key)
                per_node_axis.setdefault((id(s.node), s.axis), set()).add(key)
            reason = None
            if value.is_graph_output():
                reason = f"parameter '{value.name}' is a model output"
            elif any(len(keys) > 1 for keys in per_node_axis.values()):
                reason = f"parameter '{value.name}' follows two channel layouts in one node"
            if reason is not None:
                for s in slices:
                    self.fix(s.layout, reason)
            elif not users <= recorded or any(len(keys) > 1 for keys in per_axis.values()):
                self.private.add(value)

    # -- result ----------------------------------------------------------------------------
    def resolve(self, layout: Layout | None) -> Layout | None:
        return None if layout is None else self.expand(layout)

    def result(self) -> DependencyGraph:
        # reasons given to a group before it was refined belong to its parts
        for root in list(self.reasons):
            if self.uf.find(root) in self.parts:
                for seg in self.expand((Segment(root),)):
                    self.reasons.setdefault(seg.group, []).extend(self.reasons[root])
        groups: dict[int, ChannelGroup] = {}
        for gid in range(len(self.sizes)):
            root = self.uf.find(gid)
            if root not in groups and root not in self.parts:
                groups[root] = ChannelGroup(root, self.sizes[root], origin=self.origins[root])
        for root, reasons in self.reasons.items():
            if self.uf.find(root) in groups:
                groups[self.uf.find(root)].reasons.extend(reasons)
        axes = {v: ChannelAxis(ca.axis, self.resolve(ca.layout)) for v, ca in self.axes.items()}
        for value, ca in axes.items():
            for seg in dict.fromkeys(s.group for s in ca.layout):
                groups[seg].tensors.append(value.name)
        seen: set[tuple] = set()
        for s in self.slices:
            resolved = ParamSlice(s.value, s.axis, self.resolve(s.layout), s.role, s.kind, s.node)
            key = (id(s.value), s.axis, id(s.node))
            if key in seen:
                continue
            seen.add(key)
            for gid in dict.fromkeys(seg.group for seg in resolved.layout):
                groups[gid].slices.append(resolved)
        layers = [ComputeLayer(la.node, la.kind, la.macs, self.resolve(la.in_layout),
                               self.resolve(la.out_layout), la.weight_shape) for la in self.layers]
        rewrites = [_Rewrite(r.kind, r.node, tuple(self.resolve(lay) for lay in r.layouts),
                             r.index, r.input, r.array) for r in self.rewrites]
        for g in groups.values():
            if g.prunable and not any(s.role == "produce" and s.kind == "weight"
                                      for s in g.slices):
                g.reasons.append("no layer produces these channels")
        return DependencyGraph(groups, axes, layers, rewrites, frozenset(self.private))


def _evaluate(node: ir.Node, arrays: Sequence[np.ndarray | None], opset: int,
              output: int) -> np.ndarray | None:
    """Output ``output`` of ``node`` on constant inputs, or None if it cannot be evaluated."""
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
    outs = [f"out{i}" if o else "" for i, o in enumerate(proto.output)]
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(outs)
    inits = [onnx.numpy_helper.from_array(np.asarray(a), n)
             for n, a in zip(names, arrays, strict=True) if a is not None]
    graph = onnx.helper.make_graph([proto], "static", [],
                                   [onnx.helper.make_empty_tensor_value_info(outs[output])],
                                   inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception:  # noqa: BLE001 - whatever the evaluator refuses stays unknown
        return None


def _split_reshape(in_shape: Shape, channel: int, out_shape: Shape) -> tuple[int, int] | None:
    """Where a reshape splits the channel axis into several ([.., n, ..] -> [.., n / f, f1,
    f2, ..] with f = f1 * f2 * ..): the first of them and f, or None."""
    before = math.prod(in_shape[:channel])
    n = in_shape[channel]
    for out_axis in range(len(out_shape)):
        if math.prod(out_shape[:out_axis]) != before:
            continue
        if out_shape[out_axis] in (1, n) or n % out_shape[out_axis]:
            continue
        merged = out_shape[out_axis]
        for k in range(out_axis + 1, len(out_shape)):
            merged *= out_shape[k]
            if merged == n:
                return out_axis, n // out_shape[out_axis]
            if merged > n:
                break
    return None


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

    # every (value, axis) once: a weight is sliced on its output and its input axis; a
    # private parameter once per node using it, into that node's own copy
    names = NameScope(model.graph)
    todo: dict[tuple[ir.Value, ir.Node | None], dict[int, ParamSlice]] = {}
    for gid in transforms:
        for s in graph.groups[gid].slices:
            owner = s.node if s.value in graph.private else None
            todo.setdefault((s.value, owner), {})[s.axis] = s
    for (value, owner), by_axis in todo.items():
        original = value.const_value.numpy()
        array = np.asarray(original)
        for axis, s in sorted(by_axis.items()):
            array = _transform_axis(array, axis, s.layout, transforms, s.role, sizes)
        array = np.ascontiguousarray(array.astype(original.dtype))
        if owner is None:
            value.const_value = ir.tensor(array, name=value.name)
            value.shape = ir.Shape(array.shape)
            continue
        copy = _initializer(owner.graph, names(f"{value.name}_{owner.name or 'node'}"), array)
        for index, used in enumerate(owner.inputs):
            if used is value:
                owner.replace_input_with(index, copy)

    touched = set(transforms)
    for value, ca in graph.axes.items():
        if not any(s.group in touched for s in ca.layout) or value.shape is None:
            continue
        dims = list(value.shape.dims)
        if len(dims) >= -ca.axis:
            dims[ca.axis] = graph.length(ca.layout, new_sizes)
            value.shape = ir.Shape(dims)

    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    for rewrite in graph.rewrites:
        if not any(s.group in touched for lay in rewrite.layouts for s in lay):
            continue
        node = rewrite.node
        if rewrite.kind == "group":
            node.attributes["group"] = ir.AttrInt64("group",
                                                    graph.length(rewrite.layouts[0], new_sizes))
        elif rewrite.kind == "entry":
            # read the input as it is now: an earlier rewrite may have replaced it already
            current = node.inputs[rewrite.input]
            target = constant_array(current)
            target = (rewrite.array if target is None else target).copy()
            flat = target.reshape(-1)
            flat[rewrite.index] = graph.length(rewrite.layouts[0], new_sizes)
            base = current.name if current is not None and current.name else "shape"
            node.replace_input_with(rewrite.input,
                                    _initializer(node.graph, names(f"{base}_shrunk"), target))
        elif rewrite.kind == "split":
            split = np.array([graph.length(lay, new_sizes) for lay in rewrite.layouts],
                             dtype=np.int64)
            if opset < 13:
                node.attributes["split"] = ir.AttrInt64s("split", [int(v) for v in split])
                continue
            new = _initializer(node.graph, names(f"{node.name or 'split'}_sizes"), split)
            if len(node.inputs) < 2:
                node.resize_inputs(2)
            node.replace_input_with(1, new)
            if "num_outputs" in node.attributes:
                del node.attributes["num_outputs"]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array`` as it is (dtype kept)."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def layout_matrix(graph: DependencyGraph, layout: Layout,
                  transforms: Mapping[int, ChannelTransform], role: str = "produce"
                  ) -> np.ndarray:
    """(new entries, old entries): how an axis laid out as ``layout`` changes under
    ``transforms`` (identity for groups without one), each channel's block of entries
    moving together."""
    blocks = []
    for seg in layout:
        n = graph.groups[seg.group].size
        t = transforms.get(seg.group)
        matrix = np.eye(n) if t is None else (t.produce if role == "produce" else t.consume)
        blocks.append(np.kron(matrix, np.eye(seg.block)))
    rows = sum(b.shape[0] for b in blocks)
    cols = sum(b.shape[1] for b in blocks)
    out = np.zeros((rows, cols))
    r = c = 0
    for b in blocks:
        out[r:r + b.shape[0], c:c + b.shape[1]] = b
        r, c = r + b.shape[0], c + b.shape[1]
    return out
