"""Structured pruning: remove whole channels (filters, neurons) from every coupled tensor.

The dependency graph (``dependency.py``) says which channels must go together; a criterion
(``importance.py``) scores them; this pass decides how many each group keeps so that the model
keeps ``ratio`` of its MACs, then physically removes the rest: producers' output rows,
consumers' input columns, biases, BatchNorm statistics, depthwise filters, reshape constants.

Ranking: ``per-layer`` keeps the same fraction of every group; ``global`` ranks all channels
together by score normalised by its group's mean and removes the least important first. Either
way no group drops below ``min_channels_fraction`` of its channels (and at least one).

With calibration data, each layer that reads pruned channels is then fitted to what the
original layer produced (asymmetric least squares on the calibration activations, in graph
order, so every layer sees the inputs the pruned network really gives it), with a ridge that
pulls towards the plainly pruned weights; ``refit=False`` corrects the bias only (the mean of
what was removed). The same machinery finishes the LSH merging pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch

from compressor.errors import OptionError
from compressor.latency import (
    WHOLE_MODEL_MIN_TIME_S,
    LatencyTable,
    activation_nodes,
    candidate_model,
    filler,
    fused_activation,
    predicted_whole_ms,
    prediction_stats,
)
from compressor.passes.base import LayerRecord, Pass, PassConfig, PassResult
from compressor.passes.budget import EXCLUDED_REASON
from compressor.passes.calibrate import (
    DEFAULT_BATCH_SIZE,
    Calibration,
    conv_output_positions,
    conv_patches,
    feature_rows,
    sampled_rows,
)
from compressor.passes.dependency import (
    ChannelGroup,
    ChannelTransform,
    ComputeLayer,
    DependencyGraph,
    analyze,
    layout_matrix,
    shrink,
)
from compressor.passes.graph import ConvAttributes, NameScope, constant_array, conv_attributes
from compressor.passes.importance import (
    CRITERIA,
    ConsumerView,
    GroupView,
    activation_means,
    channel_features,
    make_criterion,
)
from compressor.passes.lowrank import find_linear_layers, gather_moments
from compressor.passes.walk import CalibrationWalk
from compressor.profile import profile_model, static_shapes

RANKINGS = ("global", "per-layer")
REFITTABLE = ("conv", "gemm", "matmul")


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    """ratio: fraction of the model's MACs to keep. criterion: one of ``CRITERIA``.
    ranking: ``global`` or ``per-layer``. min_channels_fraction: no group keeps fewer than this
    fraction of its channels (and never fewer than one). channel_multiple: kept counts are
    multiples of this where the group allows (8 suits onnxruntime's blocked kernels).
    refit: with calibration data, least-squares refit of the layers reading pruned channels,
    layer by layer on the pruned network's own activations (else only their bias is
    corrected). ridge: pull of the refit towards the plainly pruned weights, relative to the
    mean input energy. lsh_bits/lsh_tables: SimHash of the ``lsh`` criterion.
    speedup: with a latency table, prune until the model is predicted this many times faster
    by measured time (``ratio`` then caps the MACs as well: 1.0 for no cap). exclude: names of
    layers to keep dense: every group they produce or read is left whole."""

    ratio: float = 0.5
    criterion: str = "l1"
    ranking: str = "global"
    min_channels_fraction: float = 0.1
    channel_multiple: int = 1
    refit: bool = True
    lsh_bits: int = 6
    lsh_tables: int = 4
    ridge: float = 0.003
    max_rows_per_batch: int = 8192
    seed: int = 0
    speedup: float | None = None
    exclude: frozenset[str] = frozenset()

    def __post_init__(self):
        check_common(self.ratio, self.min_channels_fraction, self.channel_multiple)
        if self.speedup is not None and not self.speedup >= 1:
            raise OptionError(f"--speedup must be >= 1 (how many times faster), "
                              f"got {self.speedup}")
        object.__setattr__(self, "exclude", frozenset(self.exclude))
        if self.criterion not in CRITERIA:
            raise OptionError(f"unknown --criterion '{self.criterion}': choose from "
                              f"{', '.join(CRITERIA)}")
        if self.ranking not in RANKINGS:
            raise OptionError(f"ranking must be one of {RANKINGS}, got '{self.ranking}'")
        if self.lsh_bits < 1 or self.lsh_bits > 64 or self.lsh_tables < 1:
            raise OptionError("--lsh-bits must be in [1, 64] and --lsh-tables >= 1")


def check_common(ratio: float, min_fraction: float, multiple: int) -> None:
    if not 0 < ratio <= 1:
        raise OptionError(f"--ratio must be in (0, 1], got {ratio}")
    if not 0 <= min_fraction <= 1:
        raise OptionError(f"--min-channels-fraction must be in [0, 1], got {min_fraction}")
    if multiple < 1:
        raise OptionError(f"channel multiple must be >= 1, got {multiple}")


# ---------------------------------------------------------------------------- budget


def min_channels(group: ChannelGroup, fraction: float, multiple: int = 1) -> int:
    """The fewest channels ``group`` may keep."""
    least = max(1, math.ceil(fraction * group.size - 1e-9))
    if multiple > 1 and group.size >= multiple:
        least = min(group.size, math.ceil(least / multiple) * multiple)
    return least


class MacsCounter:
    """MACs of the compute layers as group sizes change, updated incrementally."""

    def __init__(self, graph: DependencyGraph):
        self.graph = graph
        self.sizes: dict[int, int] = {}
        self.by_group: dict[int, list[int]] = {}
        for i, layer in enumerate(graph.layers):
            for layout in (layer.in_layout, layer.out_layout):
                for seg in layout or ():
                    self.by_group.setdefault(seg.group, []).append(i)
        self.per_layer = [graph.layer_macs(layer, {}) for layer in graph.layers]
        self.total = sum(self.per_layer)

    def set(self, group: int, size: int) -> int:
        self.sizes[group] = size
        for i in dict.fromkeys(self.by_group.get(group, [])):
            new = self.graph.layer_macs(self.graph.layers[i], self.sizes)
            self.total += new - self.per_layer[i]
            self.per_layer[i] = new
        return self.total


def per_layer_sizes(graph: DependencyGraph, groups: Sequence[ChannelGroup], budget: float,
                    mins: Mapping[int, int], multiple: int = 1,
                    fits: Callable[[dict[int, int]], bool] | None = None) -> dict[int, int]:
    """The same kept fraction for every group: the largest that fits ``budget`` MACs (or, with
    ``fits``, the largest whose sizes it accepts, e.g. a predicted time)."""
    if fits is None:
        def fits(sizes: dict[int, int]) -> bool:
            return graph.macs(sizes) <= budget

    def sizes_at(fraction: float) -> dict[int, int]:
        out = {}
        for g in groups:
            k = math.ceil(fraction * g.size - 1e-9)
            if multiple > 1:
                k = math.ceil(k / multiple) * multiple
            out[g.id] = int(min(g.size, max(mins[g.id], k)))
        return out

    if fits(sizes_at(1.0)):
        return sizes_at(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if fits(sizes_at(mid)):
            lo = mid
        else:
            hi = mid
    return sizes_at(lo)


def _chunks(size: int, removable: int, multiple: int) -> list[int]:
    """How many channels each removal step takes: ``multiple`` at a time, the first step
    bringing the count to a multiple."""
    counts, position = [], 0
    first = size % multiple if multiple > 1 else 0
    while position < removable:
        count = first if (position == 0 and first) else multiple
        count = min(count, removable - position)
        counts.append(count)
        position += count
    return counts


def global_sizes(graph: DependencyGraph, groups: Sequence[ChannelGroup],
                 scores: Mapping[int, np.ndarray], budget: float, mins: Mapping[int, int],
                 multiple: int = 1, comparable: bool = False) -> dict[int, int]:
    """Remove the globally least important channels, ``multiple`` at a time per group, until
    the MACs fit ``budget``.

    Scores are normalised by their group's mean, unless the criterion's are ``comparable``
    across groups (cumulative relative errors): then each step removes the chunk that adds the
    least error per MAC it saves, so cheap-to-lose, costly-to-keep channels go first.
    """
    counter = MacsCounter(graph)
    sizes = {g.id: g.size for g in groups}
    if not comparable:
        chunks: list[tuple[float, int, int]] = []  # (score, group, count)
        for g in groups:
            s = np.asarray(scores[g.id], dtype=np.float64)
            mean = s.mean()
            normalized = np.sort(s / mean if mean > 0 else s)
            position = 0
            for count in _chunks(g.size, g.size - mins[g.id], multiple):
                chunks.append((float(normalized[position:position + count].mean()), g.id, count))
                position += count
        chunks.sort(key=lambda c: c[0])
        for _, gid, count in chunks:
            if counter.total <= budget:
                break
            sizes[gid] -= count
            counter.set(gid, sizes[gid])
        return sizes
    steps = {g.id: _chunks(g.size, g.size - mins[g.id], multiple) for g in groups}
    cumulative = {g.id: np.sort(np.asarray(scores[g.id], dtype=np.float64)) for g in groups}
    removed = dict.fromkeys(sizes, 0)
    taken = dict.fromkeys(sizes, 0)

    def value(gid: int) -> float:
        count = steps[gid][taken[gid]]
        before = cumulative[gid][removed[gid] - 1] if removed[gid] else 0.0
        added = cumulative[gid][removed[gid] + count - 1] - before
        now = counter.total
        saved = now - counter.set(gid, sizes[gid] - count)
        counter.set(gid, sizes[gid])
        return added / max(saved, 1)

    while counter.total > budget:
        candidates = [(value(gid), gid) for gid in sizes if taken[gid] < len(steps[gid])]
        if not candidates:
            break
        _, gid = min(candidates)
        count = steps[gid][taken[gid]]
        taken[gid] += 1
        removed[gid] += count
        sizes[gid] -= count
        counter.set(gid, sizes[gid])
    return sizes


GRID_POINTS = 16  # measured widths per layer axis at most; times in between are interpolated
TIMED_KINDS = ("conv", "depthwise", "conv_transpose", "gemm", "matmul")


@dataclass
class _Axis:
    """One width of a timed layer: ``dense`` entries (channels, or features after a
    Flatten), changing in steps of ``step`` between measured points; fixed when step is 0."""

    dense: int
    step: int

    def grid(self, entries: int) -> list[tuple[int, float]]:
        """Measured widths and their weights that interpolate the time at ``entries``."""
        if self.step == 0 or entries >= self.dense or entries % self.step == 0:
            return [(entries, 1.0)]
        low = entries - entries % self.step
        if low == 0:  # below the first grid point: measured as it is
            return [(entries, 1.0)]
        high = min(low + self.step, self.dense)
        t = (entries - low) / (high - low)
        return [(low, 1.0 - t), (high, t)]


class LayerLatencies:
    """Measured time of each compute layer as a function of its kept widths.

    A layer that reads or produces a prunable group is timed alone, on its real input shape at
    the table's batch with the activation onnxruntime fuses after it, at (input, output)
    widths; points are measured when first asked for and cached by the table. Widths are
    measured on a grid of multiples of ``step`` (the channel multiple, coarsened so that an
    axis has at most ``GRID_POINTS`` points); a time between grid points is interpolated
    linearly in each width (bilinearly in both), the dense width and the widths below the
    first grid point being measured exactly. A depthwise layer has one width (its outputs
    follow its inputs). Layers of other kinds (attention's batched MatMuls) are left out: their
    time counts at its dense value.
    """

    def __init__(self, graph: DependencyGraph, groups: Sequence[ChannelGroup],
                 table: LatencyTable, original: onnx.ModelProto, multiple: int = 1):
        self.graph = graph
        self.table = table
        self.shapes, _ = static_shapes(original, batch=1)
        self.opset = next((o.version for o in original.opset_import
                           if o.domain in ("", "ai.onnx")), 18)
        self.prunable = {g.id for g in groups}
        self.multiple = multiple
        self.indices: list[int] = []
        self.axes: dict[int, tuple[_Axis, _Axis]] = {}
        self.by_group: dict[int, list[int]] = {}
        for i, layer in enumerate(graph.layers):
            touched = {s.group for s in (layer.in_layout or ()) + (layer.out_layout or ())
                       if s.group in self.prunable}
            if not touched or layer.kind not in TIMED_KINDS:
                continue
            self.indices.append(i)
            self.axes[i] = (self._axis(layer.in_layout, layer, "in"),
                            self._axis(layer.out_layout, layer, "out"))
            for gid in touched:
                self.by_group.setdefault(gid, []).append(i)
        self._points: dict[tuple[int, int, int], float] = {}
        self._activations = {i: fused_activation(graph.layers[i].node) for i in self.indices}

    def _axis(self, layout, layer: ComputeLayer, side: str) -> _Axis:
        dense = self._dense_width(layer, side)
        segments = [s for s in layout or () if s.group in self.prunable]
        if not segments or (side == "out" and layer.kind == "depthwise"):
            return _Axis(dense, 0)
        steps = []
        for seg in segments:
            size = self.graph.groups[seg.group].size
            chunk = self.multiple * max(1, math.ceil(size / (self.multiple * GRID_POINTS)))
            steps.append(chunk * seg.block)
        return _Axis(dense, min(steps))

    def _dense_width(self, layer: ComputeLayer, side: str) -> int:
        layout = layer.in_layout if side == "in" else layer.out_layout
        if layout is not None:
            return self.graph.length(layout)
        w = layer.weight_shape
        if layer.kind in ("conv", "depthwise"):
            return w[0] if side == "out" else self.shapes[layer.node.inputs[0].name][1]
        if layer.kind == "conv_transpose":
            group = layer.node.attributes.get_int("group", 1)
            return w[1] * group if side == "out" else w[0]
        if layer.kind == "gemm":
            trans_b = layer.node.attributes.get_int("transB", 0)
            if side == "out":
                return w[0] if trans_b else w[1]
            return w[1] if trans_b else w[0]
        return w[1] if side == "out" else w[0]  # matmul

    def widths(self, i: int, sizes: Mapping[int, int]) -> tuple[int, int]:
        layer = self.graph.layers[i]
        axis_in, axis_out = self.axes[i]
        cin = self.graph.length(layer.in_layout, sizes) if axis_in.step else axis_in.dense
        if layer.kind == "depthwise":
            return cin, cin * axis_out.dense // axis_in.dense
        cout = self.graph.length(layer.out_layout, sizes) if axis_out.step else axis_out.dense
        return cin, cout

    def layer_ms(self, i: int, sizes: Mapping[int, int]) -> float:
        """Time of layer ``i`` when group g keeps ``sizes[g]`` channels (dense elsewhere)."""
        cin, cout = self.widths(i, sizes)
        axis_in, axis_out = self.axes[i]
        layer = self.graph.layers[i]
        total = 0.0
        for a, wa in axis_in.grid(cin):
            if layer.kind == "depthwise":
                total += wa * self.point(i, a, a * axis_out.dense // axis_in.dense)
                continue
            for b, wb in axis_out.grid(cout):
                total += wa * wb * self.point(i, a, b)
        return total

    def dense_ms(self, i: int) -> float:
        return self.layer_ms(i, {})

    def total(self, sizes: Mapping[int, int]) -> float:
        return sum(self.layer_ms(i, sizes) for i in self.indices)

    def point(self, i: int, cin: int, cout: int) -> float:
        key = (i, cin, cout)
        if key not in self._points:
            self._points[key] = self.table.time(self.timing_model(i, cin, cout))
        return self._points[key]

    def timing_model(self, i: int, cin: int, cout: int) -> onnx.ModelProto:
        """Layer ``i`` alone with ``cin`` input and ``cout`` output entries, followed by its
        fused activation; filler weights (the time does not depend on their values)."""
        layer = self.graph.layers[i]
        node = ir.serde.serialize_node(layer.node)
        x_shape = list(self.shapes[layer.node.inputs[0].name])
        x_shape[0] = self.table.context.batch
        w = list(layer.weight_shape)
        if layer.kind in ("conv", "depthwise", "conv_transpose"):
            x_shape[1] = cin
        else:
            x_shape[-1] = cin
        if layer.kind == "conv":
            w[0], w[1] = cout, cin
        elif layer.kind == "depthwise":
            w[0] = cout
            del node.attribute[:]
            node.attribute.extend(
                onnx.helper.make_attribute(a.name, cin) if a.name == "group" else a
                for a in ir.serde.serialize_node(layer.node).attribute)
        elif layer.kind == "conv_transpose":
            w[0], w[1] = cin, cout // layer.node.attributes.get_int("group", 1)
        elif layer.kind == "gemm" and layer.node.attributes.get_int("transB", 0):
            w[0], w[1] = cout, cin
        else:  # gemm without transB, matmul
            w[0], w[1] = cin, cout
        inits = {"w": filler(w)}
        inputs = ["x", "w"]
        bias = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
        if bias is not None:
            shape = tuple(bias.const_value.shape) if bias.const_value is not None else (cout,)
            inits["b"] = filler((cout,) if math.prod(shape) > 1 else shape)
            inputs.append("b")
        del node.input[:]
        del node.output[:]
        node.input.extend(inputs)
        node.output.append("z")
        node.name = "layer"
        act, act_inits, out = activation_nodes(self._activations[i], "z", "y")
        inits.update(act_inits)
        return candidate_model([node, *act], {"x": (x_shape, np.float32)},
                               {out: (None, np.float32)}, inits, self.opset)


def latency_sizes(graph: DependencyGraph, groups: Sequence[ChannelGroup],
                  scores: Mapping[int, np.ndarray], latency: LayerLatencies, budget_ms: float,
                  mins: Mapping[int, int], multiple: int = 1, comparable: bool = False,
                  macs_budget: float | None = None) -> tuple[dict[int, int], set[int]]:
    """Remove channel chunks, least importance per millisecond saved first, until the
    predicted time of the timed layers fits ``budget_ms`` (and their MACs ``macs_budget``,
    then by importance per MAC saved).

    Importance is the chunk's added cumulative error (``comparable`` criteria) or the sum of
    its scores normalised by the group's mean. Where the next chunk saves no time (blocked
    kernels run 56 channels as 64), the step takes as many chunks as it needs to save some. A
    group whose every narrower width is measured no faster stays whole, and a group left at
    widths predicted slower than whole at the end is restored. Returns the sizes and the ids
    of the groups kept whole because narrowing them saved no time.
    """
    counter = MacsCounter(graph)
    sizes = {g.id: g.size for g in groups}
    steps = {g.id: _chunks(g.size, g.size - mins[g.id], multiple) for g in groups}
    taken = dict.fromkeys(sizes, 0)
    removed = dict.fromkeys(sizes, 0)
    if comparable:
        ranked = {g.id: np.sort(np.asarray(scores[g.id], dtype=np.float64)) for g in groups}
    else:
        ranked = {}
        for g in groups:
            s = np.asarray(scores[g.id], dtype=np.float64)
            mean = s.mean()
            ranked[g.id] = np.cumsum(np.sort(s / mean if mean > 0 else s))

    def importance(gid: int, count: int) -> float:
        before = ranked[gid][removed[gid] - 1] if removed[gid] else 0.0
        return float(ranked[gid][removed[gid] + count - 1] - before)

    def group_ms(gid: int, trial: Mapping[int, int]) -> float:
        return sum(latency.layer_ms(i, trial) for i in latency.by_group.get(gid, ()))

    def move(gid: int, by_time: bool) -> tuple[float, int, int] | None:
        """(importance per unit saved, chunks, channels) of the next useful step of ``gid``."""
        before_ms = group_ms(gid, sizes)
        count = 0
        for j in range(taken[gid], len(steps[gid])):
            count += steps[gid][j]
            trial = {**sizes, gid: sizes[gid] - count}
            if by_time:
                saved = before_ms - group_ms(gid, trial)
            else:
                now = counter.total
                saved = now - counter.set(gid, trial[gid])
                counter.set(gid, sizes[gid])
            if saved > 0:
                return importance(gid, count) / saved, j + 1 - taken[gid], count
        return None

    total_ms = latency.total(sizes)
    slow: set[int] = set()
    while True:
        time_ok = total_ms <= budget_ms
        if time_ok and (macs_budget is None or counter.total <= macs_budget):
            break
        best = None
        for gid in sizes:
            if taken[gid] >= len(steps[gid]):
                continue
            found = move(gid, by_time=not time_ok)
            if found is None:
                if not time_ok and removed[gid] == 0:
                    slow.add(gid)
                continue
            if best is None or found[0] < best[0]:
                best = (found[0], gid, found[1], found[2])
        if best is None:
            break
        _, gid, chunks, count = best
        slow.discard(gid)
        taken[gid] += chunks
        removed[gid] += count
        sizes[gid] -= count
        counter.set(gid, sizes[gid])
        total_ms = latency.total(sizes)
    for gid in list(sizes):
        if removed[gid] == 0:
            continue
        whole = {**sizes, gid: next(g.size for g in groups if g.id == gid)}
        if group_ms(gid, whole) < group_ms(gid, sizes):
            counter.set(gid, whole[gid])
            if macs_budget is not None and counter.total > macs_budget:
                counter.set(gid, sizes[gid])
                continue
            sizes = whole
            slow.add(gid)
    return sizes, slow


def top_channels(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` highest scores (ties: the earlier channel)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:keep])


# ---------------------------------------------------------------------------- refit


@dataclass
class _Linear:
    kind: str  # conv | gemm | matmul
    weight: np.ndarray  # (outputs, fan_in) float64, alpha applied
    bias: np.ndarray | None  # (outputs,), beta applied
    conv: ConvAttributes | None = None


def _read_linear(node: ir.Node) -> _Linear | None:
    weight = constant_array(node.inputs[1])
    if weight is None:
        return None
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = constant_array(bias_value) if bias_value is not None else None
    if node.op_type == "Conv":
        attrs = conv_attributes(node, weight.shape)
        if isinstance(attrs, str) or attrs.group != 1:
            return None
        return _Linear("conv", weight.reshape(len(weight), -1).astype(np.float64),
                       None if bias is None else bias.astype(np.float64), attrs)
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        w2 = weight if node.attributes.get_int("transB", 0) else weight.T
        w2 = alpha * w2.astype(np.float64)
        if bias is not None:
            bias = beta * np.broadcast_to(bias.astype(np.float64).reshape(-1), (len(w2),))
        return _Linear("gemm", w2, bias)
    if node.op_type == "MatMul" and weight.ndim == 2:
        return _Linear("matmul", weight.T.astype(np.float64), None)
    return None


def _set_param(node: ir.Node, index: int, array: np.ndarray, names: NameScope) -> None:
    """Give input ``index`` of ``node`` the constant ``array`` (in place when only this node
    uses it, else as a new initializer)."""
    array = np.ascontiguousarray(array.astype(np.float32))
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is not None and value.const_value is not None and len(value.uses()) == 1 \
            and not value.is_graph_output() and not value.is_graph_input():
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    base = value.name if value is not None else f"{node.name or node.op_type}_bias"
    name = names(f"{base}_refit")
    new = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    new.dtype = new.const_value.dtype
    node.graph.register_initializer(new)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)


def _write_linear(node: ir.Node, linear: _Linear, weight: np.ndarray, bias: np.ndarray | None,
                  names: NameScope) -> None:
    old = constant_array(node.inputs[1])
    if linear.kind == "conv":
        _set_param(node, 1, weight.reshape(len(weight), *old.shape[1:]), names)
        if bias is not None:
            _set_param(node, 2, bias, names)
    elif linear.kind == "gemm":
        alpha = node.attributes.get_float("alpha", 1.0)
        w = weight / alpha
        _set_param(node, 1, w if node.attributes.get_int("transB", 0) else w.T, names)
        if bias is not None:
            beta = node.attributes.get_float("beta", 1.0)
            if beta == 0.0 or len(node.inputs) < 3 or node.inputs[2] is None:
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                beta = 1.0
            _set_param(node, 2, bias / beta, names)
    else:
        _set_param(node, 1, weight.T, names)


def _rows(linear: _Linear, x: np.ndarray, max_rows: int, seed: int,
          first_sample: int) -> np.ndarray:
    """Input rows of the layer at positions drawn per sample (``_row_index``)."""
    if linear.kind == "conv":
        positions = conv_output_positions(x.shape, linear.conv)
        return conv_patches(x, linear.conv,
                            index=_row_index(len(x), positions, max_rows, seed, first_sample))
    rows = feature_rows(x)
    positions = rows.shape[0] // max(len(x), 1)
    return rows[_row_index(len(x), positions, max_rows, seed, first_sample)]


class _Normal:
    """Running moments for fitting ``y ~ W x_hat + b``: E[x̂a x̂a^T], E[y x̂a^T], E||y||^2 with
    x̂a = [x̂; 1] (the intercept column)."""

    def __init__(self, fan_in: int, outputs: int):
        self.count = 0
        self.hh = np.zeros((fan_in + 1, fan_in + 1))
        self.yh = np.zeros((outputs, fan_in + 1))
        self.yy = 0.0

    def add(self, y: np.ndarray, x_hat: np.ndarray) -> None:
        xa = torch.from_numpy(np.ascontiguousarray(
            np.concatenate([x_hat, np.ones((len(x_hat), 1), np.float32)], axis=1),
            dtype=np.float32))
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        self.count += len(x_hat)
        self.hh += (xa.T @ xa).double().numpy()
        self.yh += (yt.T @ xa).double().numpy()
        self.yy += float((yt * yt).sum(dtype=torch.float64))


def _solve(linear: _Linear, moments: _Normal, full: bool, ridge: float) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Refitted (weight, bias) and the relative output error on the calibration rows."""
    n = max(moments.count, 1)
    hh, yh = moments.hh / n, moments.yh / n
    d = hh.shape[0] - 1
    w0 = linear.weight
    intercept = linear.kind != "matmul"
    if full:
        # the pull towards the plainly transformed weights grows as rows per input get scarce
        # (a Gemm sees one row per calibration sample, a conv one per output position)
        scale = max(np.trace(hh[:d, :d]) / max(d, 1), 1e-12)
        lam = scale * (ridge + 0.1 * d / n)
        if intercept:
            lhs = hh + lam * np.diag(np.r_[np.ones(d), 0.0])
            rhs = yh.T + lam * np.r_[w0.T, np.zeros((1, len(w0)))]
            sol = np.linalg.solve(lhs, rhs).T
            weight, bias = sol[:, :d], sol[:, d]
        else:
            sol = np.linalg.solve(hh[:d, :d] + lam * np.eye(d), yh[:, :d].T + lam * w0.T).T
            weight, bias = sol, None
    else:
        weight = w0
        # keep E[y] exact: b = E[y] - W E[x_hat]
        bias = (yh[:, d] - w0 @ hh[:d, d]) if intercept else None
    wa = np.concatenate([weight, (bias if bias is not None else np.zeros(len(weight)))[:, None]],
                        axis=1)
    energy = moments.yy / n
    sq = energy - 2 * float(np.sum(wa * yh)) + float(np.sum((wa @ hh) * wa))
    error = math.sqrt(max(sq, 0.0) / energy) if energy > 0 else 0.0
    return weight, bias, error


@dataclass
class _Target:
    """A layer to refit and what it should produce: ``weight @ x + bias`` on the original
    network's inputs (``produce`` maps its original outputs to its kept ones), plus, when it
    feeds a residual Add, the other branch's original value less its current one."""

    layer: ComputeLayer
    linear: _Linear  # as it is now
    ref: _Linear  # as it was
    weight: np.ndarray
    bias: np.ndarray
    produce: np.ndarray
    partner: str | None

    @property
    def x_name(self) -> str:
        return self.layer.node.inputs[0].name


def _residual_partner(layer: ComputeLayer) -> str | None:
    """The other input of the Add this layer's output goes into, if that is its only use."""
    out = layer.node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    user, index = uses[0]
    if user.op_type != "Add" or len(user.inputs) != 2 or user.domain not in ("", "ai.onnx"):
        return None
    other = user.inputs[1 - index]
    if other is None or other.const_value is not None or other.shape != out.shape:
        return None
    return other.name


def _rows_per_sample(max_rows: int) -> int:
    # max_rows spread over a batch of the default size, drawn per sample: the same rows
    # whatever the batches (the calibration sizes them by the activations' bytes)
    return max(1, math.ceil(max_rows / DEFAULT_BATCH_SIZE))


def _row_index(samples: int, positions: int, max_rows: int, seed: int,
               first_sample: int) -> np.ndarray:
    """The rows ``_rows`` samples: ``_rows_per_sample`` positions of each sample."""
    return sampled_rows(first_sample, samples, positions, _rows_per_sample(max_rows), seed)


def _partner_rows(t: np.ndarray, kind: str, max_rows: int, seed: int,
                  first_sample: int) -> np.ndarray:
    """Rows of a tensor shaped like a layer's output at the positions ``_rows`` sampled."""
    rows = np.moveaxis(t, 1, -1).reshape(-1, t.shape[1]) if kind == "conv" else feature_rows(t)
    positions = rows.shape[0] // max(len(t), 1)
    return rows[_row_index(len(t), positions, max_rows, seed, first_sample)].astype(np.float64)


def fit_to_original(model: ir.Model, original: onnx.ModelProto, graph: DependencyGraph,
                    transforms: Mapping[int, ChannelTransform], calibration: Calibration, *,
                    full: bool = True, ridge: float = 0.003, max_rows: int = 8192,
                    seed: int = 0) -> dict[str, float]:
    """Fit the layers affected by ``transforms`` to the original network's outputs of those
    layers (mapped through the layer's own output transform) on the calibration data.

    ``full``: least squares on weights and bias, with a ridge towards the transformed
    weights; else the bias only. Layer by layer in graph order, each on the inputs the
    compressed network gives it by then (fitting all at once on the unfitted network's inputs
    fails badly: every layer then expects inputs its refitted predecessors no longer give).
    Every layer after the first change is fitted, whether or not its own channels changed.
    Returns each refitted layer's relative output error on the calibration rows.
    """
    touched = set(transforms)
    reference = ir.serde.deserialize_model(original)
    ref_nodes = {node.name: node for node in reference.graph if node.name}
    graph_inputs = {v.name for v in model.graph.inputs}
    names = NameScope(model.graph)
    targets: list[_Target] = []
    upstream = False
    for layer in graph.layers:
        changed_in = any(s.group in touched for s in layer.in_layout or ())
        changed_out = any(s.group in touched for s in layer.out_layout or ())
        x_name = layer.node.inputs[0].name
        if (layer.kind in REFITTABLE and x_name not in graph_inputs
                and (changed_in or upstream)):
            linear = _read_linear(layer.node)
            ref_node = ref_nodes.get(layer.node.name)
            ref = _read_linear(ref_node) if ref_node is not None else None
            if linear is not None and ref is not None:
                produce = np.eye(len(ref.weight))
                if changed_out:  # several groups side by side, or whole heads (blocks)
                    produce = layout_matrix(graph, layer.out_layout, transforms)
                ref_bias = ref.bias if ref.bias is not None else np.zeros(len(ref.weight))
                targets.append(_Target(layer, linear, ref, produce @ ref.weight,
                                       produce @ ref_bias, produce, _residual_partner(layer)))
        upstream = upstream or changed_in or changed_out
    errors: dict[str, float] = {}
    if not targets:
        return errors

    # Each target is fitted to what it should output at sampled rows of every batch: the
    # original layer's output (rows are drawn per sample with the seed, so both networks are
    # sampled at the same positions). A layer feeding a residual Add is asked for what makes
    # the *sum* right: its original output plus the original other branch, less what the other
    # branch now gives, so it also absorbs the error arriving through the shortcut. One walk
    # through both networks serves every target: no prefix runs twice.
    def fit(t: _Target, walk: CalibrationWalk) -> None:
        inputs = [t.x_name] + ([t.partner] if t.partner is not None else [])
        moments = _Normal(t.linear.weight.shape[1], len(t.weight))
        done = [0]

        def consume(ref: dict[str, np.ndarray], now: dict[str, np.ndarray]) -> None:
            first = done[0]
            done[0] = first + len(now[t.x_name])
            x = _rows(t.ref, ref[t.x_name], max_rows, seed, first)
            y = x.astype(np.float64) @ t.weight.T + t.bias
            x_hat = _rows(t.linear, now[t.x_name], max_rows, seed, first)
            if t.partner is not None:
                y += _partner_rows(ref[t.partner], t.ref.kind, max_rows, seed,
                                   first) @ t.produce.T
                y -= _partner_rows(now[t.partner], t.linear.kind, max_rows, seed, first)
            moments.add(y, x_hat)

        walk.stream(model, inputs, inputs, consume,
                    label=f"{'refit' if full else 'bias correction'} {t.layer.name}")
        weight, bias, error = _solve(t.linear, moments, full, ridge)
        _write_linear(t.layer.node, t.linear, weight, bias, names)
        errors[t.layer.name] = error

    with CalibrationWalk(calibration, reference) as walk:
        for target in targets:
            fit(target, walk)
    return errors


# ---------------------------------------------------------------------------- records


def _params(node: ir.Node) -> int:
    return sum(v.const_value.size for v in node.inputs[1:3]
               if v is not None and v.const_value is not None)


def finish(model: ir.Model, original: onnx.ModelProto, graph: DependencyGraph,
           transforms: dict[int, ChannelTransform], describe: Callable[[ChannelGroup,
           ChannelTransform], str], calibration: Calibration | None, *, refit: bool,
           ridge: float, max_rows: int, seed: int, total_macs: int) -> tuple[list[LayerRecord], dict]:
    """Shrink the model, fit what follows, and report per layer."""
    before = {layer.name: (tuple(layer.weight_shape), _params(layer.node))
              for layer in graph.layers}
    shrink(model, graph, transforms)
    errors: dict[str, float] = {}
    if calibration is not None and transforms:
        errors = fit_to_original(model, original, graph, transforms, calibration, full=refit,
                                 ridge=ridge, max_rows=max_rows, seed=seed)
    sizes = {gid: t.kept for gid, t in transforms.items()}
    records = []
    for layer in graph.layers:
        out_seg = {s.group for s in layer.out_layout or ()}
        in_seg = {s.group for s in layer.in_layout or ()}
        changed_out = [g for g in out_seg if g in transforms]
        changed_in = [g for g in in_seg if g in transforms]
        shape_before, params_before = before[layer.name]
        weight = layer.node.inputs[1]  # an activation for a batched MatMul (attention)
        weight = weight.const_value if weight.const_value is not None else weight
        record = LayerRecord(
            name=layer.name, op=layer.node.op_type, shape_before=shape_before,
            shape_after=tuple(weight.shape), macs_before=layer.macs,
            macs_after=graph.layer_macs(layer, sizes), params_before=params_before,
            params_after=_params(layer.node),
        )
        parts = []
        if changed_out:
            parts += [describe(graph.groups[g], transforms[g]) for g in changed_out]
        if changed_in and layer.kind not in ("depthwise",):
            parts.append(f"inputs {graph.length(layer.in_layout)} -> "
                         f"{graph.length(layer.in_layout, sizes)}")
        if layer.name in errors:
            record.error = errors[layer.name]
            record.error_basis = "calibration"
            if not parts:
                parts.append("refit to upstream changes" if refit else "bias corrected")
            elif refit:
                parts.append("refit")
        if parts:
            record.detail = "; ".join(parts)
        else:
            reasons = [graph.groups[g].reason for g in out_seg if graph.groups[g].reason]
            record.skipped = (f"output channels fixed: {reasons[0]}" if reasons
                              else "all channels kept")
        records.append(record)
    proto = ir.serde.serialize_model(model)
    macs_after = profile_model(proto).macs
    stats = {
        "macs_before": total_macs,
        "macs_after": macs_after,
        "ratio_reached": macs_after / total_macs if total_macs else 1.0,
        "data_aware": calibration is not None,
        "groups": [
            {"origin": g.origin, "channels": g.size,
             "kept": transforms[g.id].kept if g.id in transforms else g.size,
             "skipped": g.reason}
            for g in graph.groups.values()
        ],
    }
    return records, stats


def consumer_views(model: ir.Model, prep: Prepared, calibration: Calibration,
                   max_rows: int, seed: int) -> dict[int, list[ConsumerView]]:
    """For every prunable group, the dense layers reading it with their input covariance on
    the calibration data (one pass over the network for all of them)."""
    shapes, _ = static_shapes(prep.original, batch=1)
    linear, _ = find_linear_layers(model, shapes)
    by_name = {layer.name: layer for layer in linear}
    layers = {layer.name: layer for layer in prep.graph.layers}
    wanted = {s.node.name for g in prep.groups for s in g.consumers if s.kind == "weight"}
    chosen = [by_name[n] for n in wanted if n in by_name]
    moments = gather_moments(calibration, model, chosen, max_rows, seed)
    sizes = {gid: g.size for gid, g in prep.graph.groups.items()}
    views: dict[int, list[ConsumerView]] = {}
    for name in wanted:
        if name not in by_name or name not in layers:
            continue
        lin, layout = by_name[name], layers[name].in_layout
        per_entry = lin.fan_in // prep.graph.length(layout)
        offset = 0
        for seg in layout:
            n = sizes[seg.group]
            entries = offset + np.arange(n * seg.block).reshape(n, seg.block)
            columns = (entries[:, :, None] * per_entry + np.arange(per_entry)).reshape(n, -1)
            offset += n * seg.block
            if seg.group in {g.id for g in prep.groups}:
                views.setdefault(seg.group, []).append(
                    ConsumerView(lin.weight, columns, moments[lin.name].covariance))
    return views


@dataclass
class Prepared:
    """What both structural passes start from."""

    original: onnx.ModelProto
    graph: DependencyGraph
    total_macs: int
    fixed_macs: int  # MACs outside the compute layers (custom ops)
    groups: list[ChannelGroup]

    def budget(self, ratio: float) -> float:
        """MACs the compute layers may keep."""
        return ratio * self.total_macs - self.fixed_macs


def prepare(model: ir.Model) -> Prepared:
    original = ir.serde.serialize_model(model)
    shapes2, _ = static_shapes(original, batch=2)
    shapes1, _ = static_shapes(original, batch=1)
    graph = analyze(model, shapes2, shapes1)
    total = profile_model(original).macs
    fixed = total - graph.macs({})
    groups = [g for g in graph.prunable]
    return Prepared(original, graph, total, fixed, groups)


class PruneChannelsPass(Pass):
    """Remove the least important channels of every prunable group to meet a MACs budget."""

    name = "prune"
    config_class = PruneConfig
    config: PruneConfig

    def __init__(self, config: PruneConfig | None = None,
                 calibration: Calibration | None = None, latency: LatencyTable | None = None):
        super().__init__(config)
        self.calibration = calibration
        self.latency = latency

    def call(self, model: ir.Model) -> PassResult:
        cfg = self.config
        prep = prepare(model)
        graph = prep.graph
        keep_whole(graph, cfg.exclude)
        groups = prep.groups = [g for g in prep.groups if g.prunable]
        notes: list[str] = []
        if cfg.criterion == "activation" and self.calibration is None:
            raise OptionError("criterion 'activation' needs calibration data: pass --data")
        activations = {}
        if self.calibration is not None and cfg.criterion == "activation":
            activations = activation_means(self.calibration, model, graph, groups)
        if cfg.criterion == "reconstruction" and self.calibration is None:
            raise OptionError("criterion 'reconstruction' needs calibration data: pass --data")
        consumers = {}
        if cfg.criterion == "reconstruction":
            consumers = consumer_views(model, prep, self.calibration, cfg.max_rows_per_batch,
                                       cfg.seed)
        criterion = make_criterion(cfg.criterion, bits=cfg.lsh_bits, tables=cfg.lsh_tables,
                                   seed=cfg.seed)
        scores = {
            g.id: criterion(GroupView(g, channel_features(graph, g), activations.get(g.id),
                                      consumers.get(g.id, [])))
            for g in groups
        }
        mins = {g.id: min_channels(g, cfg.min_channels_fraction, cfg.channel_multiple)
                for g in groups}
        budget = prep.budget(cfg.ratio)
        timing: _Timing | None = None
        if cfg.speedup is not None:
            sizes, timing = self._sizes_by_latency(prep, scores, mins, criterion, notes)
        elif cfg.ratio >= 1.0:
            sizes = {g.id: g.size for g in groups}
        elif cfg.ranking == "per-layer":
            sizes = per_layer_sizes(graph, groups, budget, mins, cfg.channel_multiple)
        else:
            sizes = global_sizes(graph, groups, scores, budget, mins, cfg.channel_multiple,
                                 comparable=getattr(criterion, "comparable", False))
        if graph.macs(sizes) > budget + 0.5:
            notes.append(f"ratio {cfg.ratio} is not reachable by pruning: every group at its "
                         f"minimum keeps {(graph.macs(sizes) + prep.fixed_macs) / prep.total_macs:.3f}"
                         " of the MACs")
        transforms = {
            g.id: ChannelTransform.keep(g.size, top_channels(scores[g.id], sizes[g.id]))
            for g in groups if sizes[g.id] < g.size
        }
        if self.calibration is None:
            notes.append("no calibration data: pruned layers are not refitted")

        def describe(group: ChannelGroup, t: ChannelTransform) -> str:
            return f"pruned {group.size} -> {t.kept} ({cfg.criterion})"

        records, stats = finish(
            model, prep.original, graph, transforms, describe, self.calibration,
            refit=cfg.refit, ridge=cfg.ridge,
            max_rows=cfg.max_rows_per_batch, seed=cfg.seed, total_macs=prep.total_macs)
        if timing is not None:
            timing.annotate(records, sizes)
            stats.update(timing.stats)
        return PassResult(model=model, modified=bool(transforms), layers=records, notes=notes,
                          stats=stats)

    def _sizes_by_latency(self, prep: Prepared, scores: Mapping[int, np.ndarray],
                          mins: Mapping[int, int], criterion, notes: list[str]):
        """Group sizes meeting the speedup by measured time (and the MACs cap of ratio < 1)."""
        cfg = self.config
        if self.latency is None:
            self.latency = LatencyTable()
        table = self.latency
        hits, misses = table.hits, table.misses
        whole_ms = table.time(prep.original, min_time_s=WHOLE_MODEL_MIN_TIME_S)
        latency = LayerLatencies(prep.graph, prep.groups, table, prep.original,
                                 cfg.channel_multiple)
        dense_ms = latency.total({})
        target_ms = whole_ms / cfg.speedup
        budget_ms = target_ms - (whole_ms - dense_ms)
        macs_budget = prep.budget(cfg.ratio) if cfg.ratio < 1 else None
        slow: set[int] = set()
        if cfg.ranking == "per-layer":
            def fits(sizes: dict[int, int]) -> bool:
                return latency.total(sizes) <= budget_ms and (
                    macs_budget is None or prep.graph.macs(sizes) <= macs_budget)

            sizes = per_layer_sizes(prep.graph, prep.groups, 0.0, mins, cfg.channel_multiple,
                                    fits=fits)
        else:
            sizes, slow = latency_sizes(prep.graph, prep.groups, scores, latency, budget_ms,
                                        mins, cfg.channel_multiple,
                                        comparable=getattr(criterion, "comparable", False),
                                        macs_budget=macs_budget)
        predicted_ms = predicted_whole_ms(whole_ms, dense_ms, latency.total(sizes))
        if predicted_ms > target_ms * (1 + 1e-9):
            notes.append(f"speedup {cfg.speedup:g} not reachable by pruning: predicted "
                         f"{whole_ms / predicted_ms:.2f}x ({predicted_ms:.3f} ms of "
                         f"{whole_ms:.3f} ms)")
        stats = {
            **prediction_stats(whole_ms, predicted_ms),
            "latency_cache_hits": table.hits - hits,
            "latency_cache_misses": table.misses - misses,
        }
        return sizes, _Timing(latency, slow, stats)


def keep_whole(graph: DependencyGraph, layers: frozenset[str]) -> None:
    """Make every group that an excluded layer produces or reads unprunable, so the layer
    keeps its weights as they are."""
    if not layers:
        return
    for group in graph.groups.values():
        if any((s.node.name or s.node.outputs[0].name) in layers for s in group.slices):
            group.reasons.append(EXCLUDED_REASON)


@dataclass
class _Timing:
    """The measured-time allocation of one prune run, to report per layer."""

    latency: LayerLatencies
    slow: set[int]  # groups kept whole because narrowing them saved no time
    stats: dict

    def annotate(self, records: list[LayerRecord], sizes: Mapping[int, int]) -> None:
        graph = self.latency.graph
        for i, (layer, record) in enumerate(zip(graph.layers, records, strict=True)):
            if i in self.latency.axes:
                record.latency_before_ms = self.latency.dense_ms(i)
                record.latency_after_ms = self.latency.layer_ms(i, sizes)
            if not {s.group for s in layer.out_layout or ()} & self.slow:
                continue
            if record.skipped == "all channels kept":
                record.skipped = "all channels kept: every narrower width measured no faster"
            elif record.skipped is None:
                record.detail += "; outputs kept: every narrower width measured no faster"
