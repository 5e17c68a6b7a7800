"""runtime's shared onnxruntime arena: same results as a session's own, and handed back."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compressor import runtime


def _relu_chain() -> onnx.ModelProto:
    """Three Relus: the two intermediate tensors live in the session's arena."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_shared_arena_session_computes_what_its_own_arena_does():
    x = np.random.default_rng(0).standard_normal((1000, 4)).astype(np.float32)
    own = runtime.session(_relu_chain()).run(None, {"x": x})[0]
    shared = runtime.session(_relu_chain(), shared_arena=True)
    assert runtime.shared_cpu_arena()
    for _ in range(2):
        np.testing.assert_array_equal(shared.run(None, {"x": x})[0], own)
    np.testing.assert_array_equal(own, np.maximum(-np.maximum(x, 0), 0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_shared_arena_outlives_its_sessions_until_shrunk():
    x = np.ones((2**22, 4), np.float32)  # 64 MB a tensor
    runtime.shrink_shared_arena()
    sess = runtime.session(_relu_chain(), shared_arena=True)
    sess.run(None, {"x": x})
    del sess
    held = _rss_bytes()
    runtime.shrink_shared_arena()
    # the intermediates (64 MB each, at least one of them in the arena at a time) go back
    assert held - _rss_bytes() >= 48 * 2**20
