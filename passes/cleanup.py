"""Graph cleanup before (and after) compression: fold BatchNormalization into the Conv, Gemm or
ConvTranspose before it, fold constants, drop Identity and dead nodes, and keep weights as
initializers so later passes find Conv/Gemm weights where they expect them.

The folding itself is onnxscript's rewrite rules; this pass decides beforehand which
BatchNormalization nodes can be folded, so that those it keeps come with the reason why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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

BATCHNORM_RULES = (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_gemm_rule,
    fuse_batchnorm_into_conv_transpose_rule,
)
FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class CleanupConfig(PassConfig):
    """What ``CleanupPass`` does beyond Identity removal, weight lifting and sorting."""

    fold_batchnorm: bool = True
    fold_constants: bool = True
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


class CleanupPass(Pass):
    """Fold BatchNormalization and constants, remove Identity and dead nodes, lift constant
    weights to initializers, and sort the graph topologically."""

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
        if config.fold_constants:
            stats["constants_folded"] = apply(
                lambda m: fold_constants(m, onnx_shape_inference=True)
            )
            if config.remove_dead:  # what fed the folded nodes is now dead
                stats["dead_removed"] += apply(common_passes.RemoveUnusedNodesPass())
        # Weights held in Constant nodes become initializers, where later passes look for them.
        stats["constants_lifted"] = apply(
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)
        )
        layers: list[LayerRecord] = []
        notes: list[str] = []
        if config.fold_batchnorm:
            layers, notes = _fold_batchnorms(model)
            modified |= any(layer.changed for layer in layers)
        stats["batchnorm_folded"] = sum(1 for layer in layers if layer.changed)
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
