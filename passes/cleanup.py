"""Graph cleanup before (and after) compression: fold BatchNormalization into the Conv, Gemm or
ConvTranspose before it, fold constants and run-time shape computations
(``shape_folding``), fold zero Pads into the Conv after them, drop Identity and dead nodes, and
keep weights as initializers so later passes find Conv/Gemm weights where they expect them.

The BatchNormalization folding itself is onnxscript's rewrite rules; this pass decides
beforehand which nodes can be folded, so that those it keeps come with the reason why. The Pad
folding is written here: onnxscript's ``fuse_pad_into_conv_rule`` rewrites a Conv even when the
Pad has other readers (the Pad then stays beside it) and keeps no reasons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import fold_constants
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from compressor.passes.base import LayerRecord, Pass, PassConfig, PassResult
from compressor.passes.graph import constant_array
from compressor.passes.shape_folding import FoldShapeComputationsPass

BATCHNORM_RULES = (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_gemm_rule,
    fuse_batchnorm_into_conv_transpose_rule,
)
FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class CleanupConfig(PassConfig):
    """What ``CleanupPass`` does beyond Identity removal, weight lifting and sorting.

    ``fold_constants`` covers shape computations too (``FoldShapeComputationsPass``);
    ``fold_pads`` folds constant zero Pads into the Convs reading them.
    """

    fold_batchnorm: bool = True
    fold_constants: bool = True
    fold_pads: bool = True
    remove_dead: bool = True


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def _is_constant(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.is_initializer()
        and value.const_value is not None
        and not value.is_graph_input()
    )


def _label(node: ir.Node) -> str:
    return node.name or f"{node.op_type} node"


def _why_not_foldable(batchnorm: ir.Node) -> str | None:
    """Why ``batchnorm`` cannot be folded into the node before it, or None if it can."""
    training = batchnorm.attributes.get("training_mode")
    if (training is not None and training.as_int()) or any(
        out.uses() or out.is_graph_output() for out in batchnorm.outputs[1:]
    ):
        return "it runs in training mode (uses batch statistics)"
    x = batchnorm.inputs[0] if batchnorm.inputs else None
    producer = x.producer() if x is not None else None
    if producer is None:
        return "its input is a graph input, not the output of a Conv, ConvTranspose or Gemm"
    if producer.op_type not in FOLDABLE_PRODUCERS or producer.domain not in DEFAULT_DOMAINS:
        return (
            f"its input comes from {producer.op_type} '{_label(producer)}', "
            "not a Conv, ConvTranspose or Gemm"
        )
    if len(x.uses()) > 1 or x.is_graph_output():
        return f"the output of '{_label(producer)}' is also used elsewhere"
    if len(batchnorm.inputs) != 5 or not all(_is_constant(v) for v in batchnorm.inputs[1:]):
        return "its scale, bias, mean or variance is not a constant"
    weights = [v for v in producer.inputs[1:3] if v is not None]
    if not weights or not all(_is_constant(v) for v in weights):
        return f"the weight or bias of '{_label(producer)}' is not a constant"
    for value in weights:
        if any(user is not producer for user, _ in value.uses()):
            return f"the weight or bias of '{_label(producer)}' is shared with another node"
    return None


@dataclass
class _Candidate:
    batchnorm: ir.Node
    producer_name: str
    weight_name: str | None  # the fusion rule keeps the weight initializer's name
    params: int


def _fold_batchnorms(model: ir.Model) -> tuple[list[LayerRecord], list[str]]:
    graph = model.graph
    records: list[LayerRecord] = []
    notes: list[str] = []
    candidates: list[_Candidate] = []
    for node in graph:
        if node.op_type != "BatchNormalization" or node.domain not in DEFAULT_DOMAINS:
            continue
        reason = _why_not_foldable(node)
        if reason is not None:
            records.append(LayerRecord(name=_label(node), op=node.op_type, skipped=reason))
            continue
        producer = node.inputs[0].producer()
        params = sum(v.const_value.size for v in node.inputs[1:])
        candidates.append(_Candidate(node, _label(producer), producer.inputs[1].name, params))
    if candidates:
        RewritePass(list(BATCHNORM_RULES))(model)
    # Give each fused node the name of the node it replaced, so per-layer reports before and
    # after the cleanup line up. The weight was not shared (checked), so its name finds it.
    new_names = {c.weight_name: c.producer_name for c in candidates if c.batchnorm.graph is None}
    for node in graph:
        if node.op_type in FOLDABLE_PRODUCERS and len(node.inputs) > 1 and node.inputs[1]:
            name = new_names.get(node.inputs[1].name)
            if name is not None and node.name != name:
                node.name = name
    for candidate in candidates:
        batchnorm = candidate.batchnorm
        if batchnorm.graph is not None:  # the rule declined a case our checks accepted
            records.append(
                LayerRecord(
                    name=_label(batchnorm),
                    op=batchnorm.op_type,
                    skipped=f"the fusion rule did not match it after '{candidate.producer_name}'",
                )
            )
            continue
        records.append(
            LayerRecord(
                name=_label(batchnorm),
                op=batchnorm.op_type,
                params_before=candidate.params,
                params_after=0,
                detail=f"folded into {candidate.producer_name}",
            )
        )
    for record in records:
        if record.skipped is not None:
            notes.append(f"BatchNormalization '{record.name}' kept: {record.skipped}")
    return records, notes


def _rank(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    array = constant_array(value)
    return None if array is None else array.ndim


def _pad_amounts(pad: ir.Node, rank: int | None) -> list[int] | str:
    """The Pad's begin/end amounts on every axis (ONNX order), or why they are not a constant
    zero padding."""
    mode = pad.attributes.get_string("mode", "constant")
    if mode != "constant":
        return f"mode is '{mode}', not constant padding"
    inputs = list(pad.inputs) + [None] * (4 - len(pad.inputs))
    if pad.version is not None and pad.version < 11 or (
            len(pad.inputs) == 1 and "pads" in pad.attributes):
        pads = np.asarray(pad.attributes.get_ints("pads", []), dtype=np.int64)
        value = np.asarray(pad.attributes.get_float("value", 0.0))
        axes = None
    else:
        pads = constant_array(inputs[1])
        if pads is None:
            return "its pads are computed at run time"
        value = np.zeros(()) if inputs[2] is None else constant_array(inputs[2])
        if value is None:
            return "its padding value is computed at run time"
        axes = None if inputs[3] is None else constant_array(inputs[3])
        if inputs[3] is not None and axes is None:
            return "its axes are computed at run time"
    if value.size != 1 or float(value.reshape(-1)[0]) != 0.0:
        return f"it pads with {value.reshape(-1)[0]}, not 0"
    pads = [int(p) for p in pads.reshape(-1)]
    if axes is None:
        if rank is not None and len(pads) != 2 * rank:
            return f"it has {len(pads)} pads for a rank-{rank} input"
        return pads
    if rank is None:
        return "the rank of its input is unknown"
    count = len(pads) // 2
    full = [0] * (2 * rank)
    for i, axis in enumerate(int(a) for a in axes.reshape(-1)):
        axis = axis + rank if axis < 0 else axis
        full[axis], full[axis + rank] = pads[i], pads[i + count]
    return full


def _why_pad_not_foldable(pad: ir.Node) -> str | tuple[list[int], list[ir.Node]]:
    """Why ``pad`` cannot be folded into the Convs reading it, or its spatial pads
    (begin..., end...) and those Convs."""
    out = pad.outputs[0]
    users = [user for user, _ in out.uses()]
    weights = [u.inputs[1] for u in users if u.op_type == "Conv" and len(u.inputs) > 1]
    rank = _rank(pad.inputs[0]) or next((r for r in map(_rank, weights) if r), None)
    amounts = _pad_amounts(pad, rank)
    if isinstance(amounts, str):
        return amounts
    rank = len(amounts) // 2
    if any(amounts[axis] or amounts[axis + rank] for axis in (0, 1) if axis < rank):
        return "it pads the batch or channel axis"
    if any(p < 0 for p in amounts):
        return "it crops (negative pads), which a Conv's pads cannot express"
    if out.is_graph_output():
        return "its output is a model output"
    convs: list[ir.Node] = []
    for user, index in out.uses():
        if user.op_type != "Conv" or user.domain not in DEFAULT_DOMAINS:
            return f"its output is read by {user.op_type} '{_label(user)}', not only by Convs"
        if index != 0:
            return f"its output is an input other than the data of Conv '{_label(user)}'"
        auto_pad = user.attributes.get_string("auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", ""):
            return f"Conv '{_label(user)}' uses auto_pad={auto_pad}"
        if user not in convs:
            convs.append(user)
    if not convs:
        return "its output is not used"
    return amounts[2:rank] + amounts[rank + 2:], convs


def _fold_pads(model: ir.Model) -> tuple[list[LayerRecord], list[str]]:
    """Fold constant zero Pads into the Convs that read them (Conv pads are begin/end per
    axis, so asymmetric SAME padding folds too); keep the others with the reason."""
    records: list[LayerRecord] = []
    notes: list[str] = []
    for pad in list(model.graph):
        if pad.op_type != "Pad" or pad.domain not in DEFAULT_DOMAINS:
            continue
        found = _why_pad_not_foldable(pad)
        if isinstance(found, str):
            records.append(LayerRecord(name=_label(pad), op="Pad", skipped=found))
            notes.append(f"Pad '{_label(pad)}' kept: {found}")
            continue
        spatial, convs = found
        for conv in convs:
            pads = conv.attributes.get_ints("pads", [0] * len(spatial))
            conv.attributes["pads"] = ir.AttrInt64s(
                "pads", [a + b for a, b in zip(pads, spatial, strict=True)]
            )
            conv.replace_input_with(0, pad.inputs[0])
        model.graph.remove(pad, safe=True)
        records.append(
            LayerRecord(
                name=_label(pad),
                op="Pad",
                detail=f"folded into {', '.join(_label(c) for c in convs)} (pads {spatial})",
            )
        )
    return records, notes


class CleanupPass(Pass):
    """Fold constants and shape computations, zero Pads into Convs and BatchNormalization into
    the node before it, remove Identity and dead nodes, lift constant weights to initializers,
    and sort the graph topologically."""

    name = "cleanup"
    config_class = CleanupConfig
    config: CleanupConfig

    def call(self, model: ir.Model) -> PassResult:
        config = self.config
        modified = False

        def apply(*steps: Callable[[ir.Model], ir.passes.PassResult]) -> int:
            """Run ``steps`` on the model; return how many nodes they removed."""
            nonlocal modified
            before = _node_count(model)
            for step in steps:
                modified |= step(model).modified
            return before - _node_count(model)

        stats: dict[str, int] = {"nodes_before": _node_count(model)}
        if model.functions:
            apply(common_passes.InlinePass())
        if model.ir_version >= 4:
            # Initializers listed as graph inputs (old exporters) could be overridden at run
            # time, so nothing may fold them; IR >= 4 does not need them listed.
            apply(common_passes.RemoveInitializersFromInputsPass())
        stats["identity_removed"] = apply(common_passes.IdentityEliminationPass())
        stats["dead_removed"] = 0
        layers: list[LayerRecord] = []
        notes: list[str] = []
        if config.fold_constants:
            stats["constants_folded"] = apply(
                lambda m: fold_constants(m, onnx_shape_inference=True)
            )
            if config.remove_dead:  # what fed the folded nodes is now dead
                stats["dead_removed"] += apply(common_passes.RemoveUnusedNodesPass())
            # What onnxscript leaves: shapes read with a dynamic batch, small ConstantOfShape.
            shapes = FoldShapeComputationsPass()(model)
            modified |= shapes.modified
            stats.update(shapes.stats)
            notes += shapes.notes
        # Weights held in Constant nodes become initializers, where later passes look for them.
        stats["constants_lifted"] = apply(
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)
        )
        if config.fold_pads:
            pads, pad_notes = _fold_pads(model)
            layers += pads
            notes += pad_notes
            modified |= any(layer.changed for layer in pads)
            stats["pads_folded"] = sum(1 for layer in pads if layer.changed)
            stats["pads_kept"] = len(pads) - stats["pads_folded"]
        if config.fold_batchnorm:
            batchnorms, batchnorm_notes = _fold_batchnorms(model)
            layers += batchnorms
            notes += batchnorm_notes
            modified |= any(layer.changed for layer in batchnorms)
        stats["batchnorm_folded"] = sum(
            1 for layer in layers if layer.op == "BatchNormalization" and layer.changed
        )
        stats["batchnorm_kept"] = sum(
            1 for node in model.graph.all_nodes() if node.op_type == "BatchNormalization"
        )
        if config.remove_dead:
            stats["dead_removed"] += apply(
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            )
        common_passes.TopologicalSortPass()(model)
        stats["nodes_after"] = _node_count(model)
        return PassResult(model=model, modified=modified, layers=layers, notes=notes, stats=stats)
