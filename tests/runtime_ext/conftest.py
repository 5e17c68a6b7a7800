"""Models with one DiffConv (or Conv) node, and sessions for them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime


def conv_model(
    op: str,
    x_shape,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    counts: bool = False,
    weight_as_input: bool = False,
    **attributes,
) -> onnx.ModelProto:
    """A model with one ``op`` node ('Conv', or one of compressor's ops) on input X."""
    domain = "" if op == "Conv" else runtime.OP_DOMAIN
    initializers, inputs = [], [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.shape)))
    else:
        initializers.append(numpy_helper.from_array(w, "W"))
    node_inputs = ["X", "W"]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "B"))
        node_inputs.append("B")
    outputs = ["Y"] + (["counts"] if counts else [])
    node = helper.make_node(op, node_inputs, outputs, domain=domain, name="layer", **attributes)
    graph_outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    if counts:
        graph_outputs.append(helper.make_tensor_value_info("counts", TensorProto.INT64, None))
    graph = helper.make_graph([node], "g", inputs, graph_outputs, initializers)
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        opsets.append(helper.make_opsetid(domain, runtime.OP_DOMAIN_VERSION))
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def run(model: onnx.ModelProto, feeds: dict, provider: str = "cpu", threads: int | None = None):
    return runtime.session(model, provider=provider, threads=threads).run(None, feeds)


@pytest.fixture(scope="session")
def library() -> str:
    return runtime.library_path()


# --- CUDA ------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    "cuda" not in runtime.available_providers(), reason="needs onnxruntime-gpu and a CUDA GPU")


def run_on_cuda(model: onnx.ModelProto, feeds: dict, op: str):
    """Outputs on the CUDA provider, checking from onnxruntime's profile that every `op` node
    ran there (a kernel missing for CUDA would silently fall back to the CPU one)."""
    so = runtime.session_options()
    so.enable_profiling = True
    runtime.register_library(so)
    session = runtime.inference_session(model.SerializeToString(), so,
                                        ["CUDAExecutionProvider", "CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    providers = {e["args"].get("provider") for e in events
                 if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == op}
    assert providers == {"CUDAExecutionProvider"}, providers
    return outputs
