"""A model with a float and an integer input, for the calibration and walk tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def two_input_model(deep: bool = False) -> onnx.ModelProto:
    """y = x * 2 + Cast(ids), h = ids + 1 (int64). ``deep``: y is that sum times Cast(h), so
    the integer tensor h is read at a second depth (a walk stores it)."""
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("Add", ["x2", "ids_f"], ["s" if deep else "y"]),
        helper.make_node("Add", ["ids", "one"], ["h"]),
    ]
    if deep:
        nodes += [helper.make_node("Cast", ["h"], ["h_f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["s", "h_f"], ["y"])]
    graph = helper.make_graph(
        nodes, "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def two_inputs(n: int = 10, seed: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3)).astype(np.float32),
            "ids": rng.integers(0, 1000, (n, 3))}
