"""Small hand-built ONNX graphs with the structures channel pruning must get right: residual
Add (identity and 1x1 projection shortcuts), BatchNormalization, inverted residuals with
depthwise convs, a depthwise multiplier, Concat/Split, Flatten/Reshape into Gemm, MatMul MLP
blocks, and structures the analysis must refuse. Built by hand so the tests stay fast."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

N = "N"


def model(nodes, inits, input_shape, output_shape=(10,), opset=18):
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, *input_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N, *output_shape])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _f(a):
    return np.asarray(a, dtype=np.float32)


def conv(name, x, w, b=None, **attrs):
    inputs = [x, f"{name}_w"] + ([f"{name}_b"] if b is not None else [])
    return helper.make_node("Conv", inputs, [name], name=name, **attrs)


def residual_net(rng, batchnorm=True, dead=(), duplicate=()):
    """x(3,8,8) -> stem conv 8 -> Relu -> [conv 6 -> Relu -> conv 8 (-> BN) + stem] -> Relu
    -> [conv 12 s2 -> Relu -> conv 16] + [1x1 conv 16 s2] -> Relu -> GlobalAveragePool
    -> Flatten -> Gemm 10.

    ``dead``: names of groups ('stem', 'a', 'c', 'proj') whose channels 0 and 1 are zeroed in
    every producer, so removing them is exact (without batchnorm). ``duplicate``: groups whose
    second half of channels repeats the first half in every producer, so merging is exact."""
    w = {
        "stem": (8, 3, 3, 3), "a": (6, 8, 3, 3), "b": (8, 6, 3, 3), "c": (12, 8, 3, 3),
        "d": (16, 12, 3, 3), "s": (16, 8, 1, 1),
    }
    inits = {}
    for k, shape in w.items():
        inits[f"{k}_w"] = _f(rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:])))
        inits[f"{k}_b"] = _f(rng.standard_normal(shape[0]) * 0.1)
    inits["fc_w"] = _f(rng.standard_normal((10, 16)) * 0.3)
    inits["fc_b"] = _f(rng.standard_normal(10) * 0.1)
    inits["bn_scale"] = _f(1 + 0.1 * rng.standard_normal(8))
    inits["bn_bias"] = _f(0.1 * rng.standard_normal(8))
    inits["bn_mean"] = _f(0.1 * rng.standard_normal(8))
    inits["bn_var"] = _f(1 + 0.1 * rng.random(8))
    producers = {"stem": ["stem", "b"], "a": ["a"], "c": ["c"], "proj": ["d", "s"]}
    for group in dead:
        for k in producers[group]:
            inits[f"{k}_w"][:2] = 0
            inits[f"{k}_b"][:2] = 0
    for group in duplicate:
        for k in producers[group]:
            half = len(inits[f"{k}_w"]) // 2
            inits[f"{k}_w"][half:] = inits[f"{k}_w"][:half]
            inits[f"{k}_b"][half:] = inits[f"{k}_b"][:half]
    p1 = dict(pads=[1, 1, 1, 1])
    nodes = [
        conv("stem", "x", "stem_w", "b", **p1),
        helper.make_node("Relu", ["stem"], ["r0"], name="relu0"),
        conv("a", "r0", "a_w", "b", **p1),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        conv("b", "ra", "b_w", "b", **p1),
    ]
    if batchnorm:
        nodes.append(helper.make_node("BatchNormalization",
                                      ["b", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                                      ["bn"], name="bn"))
    nodes += [
        helper.make_node("Add", ["bn" if batchnorm else "b", "r0"], ["add1"], name="add1"),
        helper.make_node("Relu", ["add1"], ["r1"], name="relu1"),
        conv("c", "r1", "c_w", "b", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["rc"], name="relu_c"),
        conv("d", "rc", "d_w", "b", **p1),
        conv("s", "r1", "s_w", "b", strides=[2, 2]),
        helper.make_node("Add", ["d", "s"], ["add2"], name="add2"),
        helper.make_node("Relu", ["add2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, inits, (3, 8, 8))


def mobile_net(rng):
    """x(2,8,8) -> conv 8 -> Clip6 -> [1x1 expand 24 -> Clip6 -> dw 3x3 -> Clip6 -> 1x1
    project 8] + residual -> dw 3x3 multiplier 2 (16) -> ReduceMean(2,3) -> Reshape(-1,16)
    -> Gemm 10."""
    inits = {
        "stem_w": _f(rng.standard_normal((8, 2, 3, 3)) * 0.3), "stem_b": _f(rng.random(8) * .1),
        "e_w": _f(rng.standard_normal((24, 8, 1, 1)) * 0.3), "e_b": _f(rng.random(24) * .1),
        "dw_w": _f(rng.standard_normal((24, 1, 3, 3)) * 0.3), "dw_b": _f(rng.random(24) * .1),
        "p_w": _f(rng.standard_normal((8, 24, 1, 1)) * 0.2),
        "m_w": _f(rng.standard_normal((16, 1, 3, 3)) * 0.3),
        "fc_w": _f(rng.standard_normal((10, 16)) * 0.3), "fc_b": _f(rng.random(10) * .1),
        "lo": _f(0.0), "hi": _f(6.0), "axes": np.array([2, 3], dtype=np.int64),
        "shape": np.array([-1, 16], dtype=np.int64),
    }
    p1 = dict(pads=[1, 1, 1, 1])
    nodes = [
        conv("stem", "x", "stem_w", "b", **p1),
        helper.make_node("Clip", ["stem", "lo", "hi"], ["c0"], name="clip0"),
        conv("e", "c0", "e_w", "b"),
        helper.make_node("Clip", ["e", "lo", "hi"], ["c1"], name="clip1"),
        conv("dw", "c1", "dw_w", "b", group=24, **p1),
        helper.make_node("Clip", ["dw", "lo", "hi"], ["c2"], name="clip2"),
        conv("p", "c2", "p_w"),
        helper.make_node("Add", ["c0", "p"], ["res"], name="residual"),
        conv("m", "res", "m_w", group=8, **p1),
        helper.make_node("ReduceMean", ["m", "axes"], ["pool"], name="pool", keepdims=1),
        helper.make_node("Reshape", ["pool", "shape"], ["flat"], name="reshape"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, inits, (2, 8, 8))


def concat_net(rng):
    """x(2,6,6) -> conv a 6 | conv b 4 -> Concat(10) -> Relu -> Split [6, 4] -> conv c 5 on
    the first part, Relu on the second -> Concat(9) -> Flatten -> Gemm 10 (blocks of 36)."""
    inits = {
        "a_w": _f(rng.standard_normal((6, 2, 3, 3)) * 0.3), "a_b": _f(rng.random(6) * .1),
        "b_w": _f(rng.standard_normal((4, 2, 3, 3)) * 0.3), "b_b": _f(rng.random(4) * .1),
        "c_w": _f(rng.standard_normal((5, 6, 3, 3)) * 0.3), "c_b": _f(rng.random(5) * .1),
        "fc_w": _f(rng.standard_normal((10, 9 * 36)) * 0.1), "fc_b": _f(rng.random(10) * .1),
        "split": np.array([6, 4], dtype=np.int64),
    }
    p1 = dict(pads=[1, 1, 1, 1])
    nodes = [
        conv("a", "x", "a_w", "b", **p1),
        conv("b", "x", "b_w", "b", **p1),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Relu", ["cat"], ["rcat"], name="relu"),
        helper.make_node("Split", ["rcat", "split"], ["s0", "s1"], name="split", axis=1),
        conv("c", "s0", "c_w", "b", **p1),
        helper.make_node("Relu", ["s1"], ["r1"], name="relu1"),
        helper.make_node("Concat", ["c", "r1"], ["cat2"], name="cat2", axis=1),
        helper.make_node("Flatten", ["cat2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, inits, (2, 6, 6))


def transformer_mlp(rng):
    """x(T=4, D=8) -> LayerNorm -> MatMul 8x32 -> Add b1 -> Relu -> MatMul 32x8 -> Add b2
    -> + x -> ReduceMean over T -> Gemm 10: the hidden width is prunable, the residual
    stream (tied to the model input and LayerNorm) is not."""
    inits = {
        "ln_s": _f(1 + 0.1 * rng.standard_normal(8)), "ln_b": _f(0.1 * rng.standard_normal(8)),
        "w1": _f(rng.standard_normal((8, 32)) * 0.3), "b1": _f(rng.standard_normal(32) * 0.1),
        "w2": _f(rng.standard_normal((32, 8)) * 0.2), "b2": _f(rng.standard_normal(8) * 0.1),
        "fc_w": _f(rng.standard_normal((10, 8)) * 0.3), "fc_b": _f(rng.random(10) * .1),
        "axes": np.array([1], dtype=np.int64),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["ln"], name="ln",
                         axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Relu", ["hb"], ["g"], name="act"),
        helper.make_node("MatMul", ["g", "w2"], ["o"], name="mm2"),
        helper.make_node("Add", ["o", "b2"], ["ob"], name="bias2"),
        helper.make_node("Add", ["ob", "x"], ["res"], name="residual"),
        helper.make_node("ReduceMean", ["res", "axes"], ["pool"], name="pool", keepdims=0),
        helper.make_node("Gemm", ["pool", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, inits, (4, 8))


def unsupported_net(rng):
    """Structures the analysis must refuse, each with a reason: a grouped conv, a Split
    through a group, a cross-channel LRN, a Reshape whose target is computed at run time."""
    inits = {
        "a_w": _f(rng.standard_normal((8, 2, 3, 3)) * 0.3),
        "g_w": _f(rng.standard_normal((8, 4, 3, 3)) * 0.3),
        "b_w": _f(rng.standard_normal((6, 8, 3, 3)) * 0.3),
        "c_w": _f(rng.standard_normal((6, 3, 1, 1)) * 0.3),
        "d_w": _f(rng.standard_normal((4, 6, 1, 1)) * 0.3),
        "e_w": _f(rng.standard_normal((5, 4, 1, 1)) * 0.3),
        "fc_wt": _f(rng.standard_normal((5 * 36, 10)) * 0.1),
        "split": np.array([3, 3], dtype=np.int64),
        "minus1": np.array([-1], dtype=np.int64),
    }
    p1 = dict(pads=[1, 1, 1, 1])
    nodes = [
        conv("a", "x", "a_w", **p1),
        conv("g", "a", "g_w", group=2, **p1),  # grouped: fixes a's and its own channels
        conv("b", "g", "b_w", **p1),
        helper.make_node("Split", ["b", "split"], ["s0", "s1"], name="split", axis=1),
        conv("c", "s0", "c_w"),
        helper.make_node("LRN", ["c"], ["lrn"], name="lrn", size=3),  # across channels
        conv("d", "lrn", "d_w"),
        helper.make_node("Relu", ["d"], ["rd"], name="relu"),
        conv("e", "rd", "e_w"),
        helper.make_node("Shape", ["e"], ["shp"], name="shape", end=1),
        helper.make_node("Concat", ["shp", "minus1"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["e", "target"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc_wt"], ["y"], name="fc"),
    ]
    return model(nodes, inits, (2, 6, 6))


def mlp(rng, hidden=(12, 8), duplicate=False):
    """x(6) -> Gemm -> Relu -> ... -> Gemm 10. ``duplicate``: every hidden neuron of the
    first layer appears twice (same row and bias), so merging pairs is exact."""
    dims = [6, *hidden, 10]
    inits, nodes, prev = {}, [], "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        w = rng.standard_normal((b, a)) / np.sqrt(a)
        bias = rng.standard_normal(b) * 0.1
        if duplicate and i == 0:
            w[b // 2:] = w[: b - b // 2]
            bias[b // 2:] = bias[: b - b // 2]
        inits[f"w{i}"], inits[f"b{i}"] = _f(w), _f(bias)
        out = "y" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out], name=f"fc{i}",
                                      transB=1))
        if out != "y":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    return model(nodes, inits, (6,))
