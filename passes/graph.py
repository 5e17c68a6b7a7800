"""Small helpers for editing ``onnx_ir`` graphs, shared by the passes."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content (initializer or folded constant), or None."""
    if value is None or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy())


def is_graph_input(graph: ir.Graph, value: ir.Value) -> bool:
    return any(value is v for v in graph.inputs)


class NameScope:
    """Hands out value/node names that do not collide with any name in the graph."""

    def __init__(self, graph: ir.Graph):
        self._taken = {v.name for v in graph.initializers.values()}
        self._taken.update(v.name for v in graph.inputs)
        for node in graph:
            self._taken.add(node.name or "")
            self._taken.update(out.name for out in node.outputs if out.name)

    def __call__(self, base: str) -> str:
        base = base.replace("/", "_").strip("_") or "value"
        if base not in self._taken:
            self._taken.add(base)
            return base
        for i in itertools.count(1):
            name = f"{base}_{i}"
            if name not in self._taken:
                self._taken.add(name)
                return name
        raise AssertionError("unreachable")


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` (float32 unless integer) as a new initializer named ``name``."""
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
    array = np.ascontiguousarray(array)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def replace_node(graph: ir.Graph, old: ir.Node, new_nodes: Sequence[ir.Node]) -> None:
    """Replace ``old`` (single output) by ``new_nodes``; the last one's output takes over
    the old output's name, uses and graph-output slot."""
    old_out = old.outputs[0]
    new_out = new_nodes[-1].outputs[0]
    new_out.name = None
    new_out.shape = old_out.shape
    new_out.type = old_out.type
    name = old_out.name
    ir.convenience.replace_nodes_and_values(graph, old, [old], list(new_nodes), [old_out], [new_out])
    new_out.name = name


@dataclass(frozen=True)
class ConvAttributes:
    """Attributes of a 2-D ONNX Conv, with defaults filled in and pads explicit."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    group: int


def conv_attributes(node: ir.Node, weight_shape: Sequence[int]) -> ConvAttributes | str:
    """The node's 2-D Conv attributes, or the reason they are not supported."""
    if len(weight_shape) != 4:
        return f"{len(weight_shape) - 2}-D convolution (only 2-D is supported)"
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", ""):
        return f"auto_pad={auto_pad} (explicit pads only; run cleanup on a shaped model)"
    kernel = tuple(node.attributes.get_ints("kernel_shape", weight_shape[2:]))
    strides = tuple(node.attributes.get_ints("strides", [1, 1]))
    pads = tuple(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    dilations = tuple(node.attributes.get_ints("dilations", [1, 1]))
    group = node.attributes.get_int("group", 1)
    if tuple(kernel) != tuple(weight_shape[2:]):
        return f"kernel_shape {kernel} does not match weight {tuple(weight_shape)}"
    return ConvAttributes(kernel, strides, pads, dilations, group)  # type: ignore[arg-type]


def conv_node(
    x: ir.Value,
    weight: ir.Value,
    bias: ir.Value | None,
    attrs: ConvAttributes,
    name: str,
) -> ir.Node:
    inputs = [x, weight] + ([bias] if bias is not None else [])
    return ir.node(
        "Conv",
        inputs,
        {
            "kernel_shape": list(attrs.kernel),
            "strides": list(attrs.strides),
            "pads": list(attrs.pads),
            "dilations": list(attrs.dilations),
            "group": attrs.group,
        },
        name=name,
    )
