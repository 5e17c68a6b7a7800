"""Small hand-built ONNX graphs with the structures channel pruning must get right: residual
Add (identity and 1x1 projection shortcuts), BatchNormalization, inverted residuals with
depthwise convs, a depthwise multiplier, Concat/Split, Flatten/Reshape into Gemm, MatMul MLP
blocks, and structures the analysis must refuse. Then the structures of real exports: Split
and Slice through a group, Resize/Upsample, Pad, attention heads, LayerNorm over the channels,
a bias shared by unrelated layers, and the channel-axis ops to refuse. Built by hand so the
tests stay fast."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
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
    """Structures the analysis must refuse, each with a reason: a grouped conv and a
    cross-channel LRN. Also a Split through a group (now cut into two groups) and a Reshape
    whose target is built at run time from the batch and -1 (now followed), which it once
    refused."""
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


# ------------------------------------------------------------------ structures of real exports


def _c(a, dtype=np.int64):
    return np.asarray(a, dtype=dtype)


def neck_net(rng):
    """A YOLO-style neck: x(3,8,8) -> conv a 8 -> SiLU (Sigmoid, Mul) -> Split [4, 4] (cuts
    a's group in two) -> [conv b 4 -> Relu] + second half -> Concat(first half, second half,
    sum) 12 -> conv c 8 -> Resize x2 (scales) -> Resize to 8x8 (sizes over axes 1, 2, 3:
    the channel entry is rewritten) -> reflect Pad (pads computed by ConstantOfShape and
    Concat) -> conv d 8 -> Slice channels [2:6] (cuts d's group in three) ->
    GlobalAveragePool -> Flatten -> Gemm 10."""
    inits = {
        "a_w": _f(rng.standard_normal((8, 3, 3, 3)) * 0.3), "a_b": _f(rng.random(8) * .1),
        "b_w": _f(rng.standard_normal((4, 4, 3, 3)) * 0.2), "b_b": _f(rng.random(4) * .1),
        "c_w": _f(rng.standard_normal((8, 12, 1, 1)) * 0.3), "c_b": _f(rng.random(8) * .1),
        "d_w": _f(rng.standard_normal((8, 8, 3, 3)) * 0.2), "d_b": _f(rng.random(8) * .1),
        "fc_w": _f(rng.standard_normal((10, 4)) * 0.3), "fc_b": _f(rng.random(10) * .1),
        "split": _c([4, 4]), "scales": _f([1, 1, 2, 2]), "sizes": _c([8, 8, 8]),
        "two": _c([2]), "ones": _c([1, 1]),
        "starts": _c([2]), "ends": _c([6]), "axes": _c([1]),
    }
    p1 = dict(pads=[1, 1, 1, 1])
    nodes = [
        conv("a", "x", "a_w", "b", **p1),
        helper.make_node("Sigmoid", ["a"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["a", "sig"], ["silu"], name="silu"),
        helper.make_node("Split", ["silu", "split"], ["s0", "s1"], name="split", axis=1),
        conv("b", "s1", "b_w", "b", **p1),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Add", ["s1", "rb"], ["res"], name="residual"),
        helper.make_node("Concat", ["s0", "s1", "res"], ["cat"], name="cat", axis=1),
        conv("c", "cat", "c_w", "b"),
        helper.make_node("Resize", ["c", "", "scales"], ["up"], name="upsample",
                         mode="nearest"),
        helper.make_node("Resize", ["up", "", "", "sizes"], ["down"], name="downsample",
                         mode="linear", axes=[1, 2, 3]),
        # pads [0, 0, 1, 1, 0, 0, 1, 1] computed from constants, as the TorchScript exporter
        # writes them (ConstantOfShape, which constant folding leaves alone)
        helper.make_node("ConstantOfShape", ["two"], ["zeros"], name="zeros",
                         value=numpy_helper.from_array(_c([0]))),
        helper.make_node("Concat", ["zeros", "ones", "zeros", "ones"], ["pads"], name="pads",
                         axis=0),
        helper.make_node("Pad", ["down", "pads"], ["padded"], name="pad", mode="reflect"),
        conv("d", "padded", "d_w", "b"),
        helper.make_node("Slice", ["d", "starts", "ends", "axes"], ["sl"], name="slice"),
        helper.make_node("GlobalAveragePool", ["sl"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, inits, (3, 8, 8))


def upsample_net(rng):
    """Opset 9: x(2,6,6) -> conv a 6 -> Upsample x2 (scales input) -> conv b 4 ->
    GlobalAveragePool -> Flatten -> Gemm 10."""
    inits = {
        "a_w": _f(rng.standard_normal((6, 2, 3, 3)) * 0.3), "a_b": _f(rng.random(6) * .1),
        "b_w": _f(rng.standard_normal((4, 6, 3, 3)) * 0.2), "b_b": _f(rng.random(4) * .1),
        "fc_w": _f(rng.standard_normal((10, 4)) * 0.3), "fc_b": _f(rng.random(10) * .1),
        "scales": _f([1, 1, 2, 2]),
    }
    p1 = dict(pads=[1, 1, 1, 1])
    nodes = [
        conv("a", "x", "a_w", "b", **p1),
        helper.make_node("Upsample", ["a", "scales"], ["up"], name="upsample", mode="nearest"),
        conv("b", "up", "b_w", "b", **p1),
        helper.make_node("GlobalAveragePool", ["b"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, inits, (2, 6, 6), opset=9)


def attention_net(rng, runtime_width=False, dead_heads=(), dead_hidden=()):
    """A transformer encoder block as an exporter writes it, on x(T=4, D=8): LayerNorm ->
    q/k/v MatMul + bias -> Reshape to 2 heads of 4 -> Transpose -> softmax(q k^T / 2) v ->
    Transpose -> Reshape to 8 -> output MatMul + bias -> + x -> LayerNorm -> MatMul 16 + bias
    -> Erf GELU (Div, Erf, Add, Mul, Mul) -> MatMul 8 + bias -> + residual -> ReduceMean over
    T -> Gemm 10.

    The heads reshape of q copies batch and T (0, 0, 2, 4); k and v share one (-1, 4, 2, 4).
    ``runtime_width``: the reshape back takes its width from Shape(x) at run time, as a
    tracing exporter writes ``view(B, T, C)``. ``dead_heads`` / ``dead_hidden``: heads whose
    q, k, v weights and biases are zero, and feed-forward units whose first weights and bias
    are zero, so removing them is exact."""
    d, heads, hidden = 8, 2, 16
    head = d // heads
    inits = {
        "ln1_s": _f(1 + 0.1 * rng.standard_normal(d)), "ln1_b": _f(0.1 * rng.standard_normal(d)),
        "ln2_s": _f(1 + 0.1 * rng.standard_normal(d)), "ln2_b": _f(0.1 * rng.standard_normal(d)),
        "w1": _f(rng.standard_normal((d, hidden)) * 0.3),
        "b1": _f(rng.standard_normal(hidden) * 0.1),
        "w2": _f(rng.standard_normal((hidden, d)) * 0.2), "b2": _f(rng.standard_normal(d) * .1),
        "fc_w": _f(rng.standard_normal((10, d)) * 0.3), "fc_b": _f(rng.random(10) * .1),
        "q_shape": _c([0, 0, heads, head]), "kv_shape": _c([-1, 4, heads, head]),
        "out_shape": _c([0, 0, d]), "scale": _f(0.5), "axes": _c([1]),
        "sqrt2": _f(np.sqrt(2.0)), "one": _f(1.0), "half": _f(0.5),
    }
    for k in ("q", "k", "v", "o"):
        inits[f"w{k}"] = _f(rng.standard_normal((d, d)) * 0.3)
        inits[f"b{k}"] = _f(rng.standard_normal(d) * 0.1)
    for h in dead_heads:
        for k in ("q", "k", "v"):
            inits[f"w{k}"][:, h * head:(h + 1) * head] = 0
            inits[f"b{k}"][h * head:(h + 1) * head] = 0
    for j in dead_hidden:
        inits["w1"][:, j] = 0
        inits["b1"][j] = 0
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln1_s", "ln1_b"], ["ln1"], name="ln1"),
    ]
    for k in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["ln1", f"w{k}"], [f"{k}_mm"], name=k),
            helper.make_node("Add", [f"{k}_mm", f"b{k}"], [k], name=f"{k}_bias"),
            helper.make_node("Reshape", [k, "q_shape" if k == "q" else "kv_shape"],
                             [f"{k}_heads"], name=f"{k}_heads"),
        ]
    nodes += [
        helper.make_node("Transpose", ["q_heads"], ["qt"], name="qt", perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_heads"], ["kt"], name="kt", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_heads"], ["vt"], name="vt", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["scores"], name="scores"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scaled"),
        helper.make_node("Softmax", ["scaled"], ["attn"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["attn", "vt"], ["ctx"], name="context"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
    ]
    if runtime_width:
        nodes += [
            helper.make_node("Shape", ["x"], ["batch_seq"], name="batch_seq", end=2),
            helper.make_node("Shape", ["x"], ["x_width"], name="x_width", start=2),
            helper.make_node("Concat", ["batch_seq", "x_width"], ["merged_shape"],
                             name="width", axis=0),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["out_shape"], ["merged_shape"],
                                      name="width"))
    nodes += [
        helper.make_node("Reshape", ["ctx_t", "merged_shape"], ["merged"], name="merge_heads"),
        helper.make_node("MatMul", ["merged", "wo"], ["o_mm"], name="o"),
        helper.make_node("Add", ["o_mm", "bo"], ["o_out"], name="o_bias"),
        helper.make_node("Add", ["x", "o_out"], ["res1"], name="residual1"),
        helper.make_node("LayerNormalization", ["res1", "ln2_s", "ln2_b"], ["ln2"], name="ln2"),
        helper.make_node("MatMul", ["ln2", "w1"], ["h_mm"], name="ff1"),
        helper.make_node("Add", ["h_mm", "b1"], ["h"], name="ff1_bias"),
        helper.make_node("Div", ["h", "sqrt2"], ["h_div"], name="gelu_div"),
        helper.make_node("Erf", ["h_div"], ["h_erf"], name="gelu_erf"),
        helper.make_node("Add", ["h_erf", "one"], ["h_add"], name="gelu_add"),
        helper.make_node("Mul", ["h", "h_add"], ["h_mul"], name="gelu_mul"),
        helper.make_node("Mul", ["h_mul", "half"], ["gelu"], name="gelu_half"),
        helper.make_node("MatMul", ["gelu", "w2"], ["f_mm"], name="ff2"),
        helper.make_node("Add", ["f_mm", "b2"], ["f"], name="ff2_bias"),
        helper.make_node("Add", ["res1", "f"], ["res2"], name="residual2"),
        helper.make_node("ReduceMean", ["res2", "axes"], ["pool"], name="pool", keepdims=0),
        helper.make_node("Gemm", ["pool", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, inits, (4, d))


def layernorm_net(rng):
    """x(T=4, D=6) -> MatMul 6x8 + bias -> LayerNorm over the 8 channels -> Relu -> MatMul
    8x5 -> ReduceMean over T -> Gemm 10: the LayerNorm's scale and bias follow the hidden
    channels, which stay prunable."""
    inits = {
        "w1": _f(rng.standard_normal((6, 8)) * 0.3), "b1": _f(rng.standard_normal(8) * 0.1),
        "ln_s": _f(1 + 0.1 * rng.standard_normal(8)), "ln_b": _f(0.1 * rng.standard_normal(8)),
        "w2": _f(rng.standard_normal((8, 5)) * 0.3),
        "fc_w": _f(rng.standard_normal((10, 5)) * 0.3), "fc_b": _f(rng.random(10) * .1),
        "axes": _c([1]),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h_mm"], name="mm1"),
        helper.make_node("Add", ["h_mm", "b1"], ["h"], name="bias1"),
        helper.make_node("LayerNormalization", ["h", "ln_s", "ln_b"], ["ln"], name="ln"),
        helper.make_node("Relu", ["ln"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="mm2"),
        helper.make_node("ReduceMean", ["o", "axes"], ["pool"], name="pool", keepdims=0),
        helper.make_node("Gemm", ["pool", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, inits, (4, 6))


def shared_bias_net(rng, dead=()):
    """x(2,6,6) -> conv a 8 -> Relu -> conv b 8 -> Relu -> GlobalAveragePool -> Flatten ->
    Gemm 10, where a and b share one zero bias initializer (as exporters deduplicate equal
    tensors) though their channels are not coupled. ``dead``: 'a' and/or 'b', whose
    channels 0 and 1 are zeroed."""
    inits = {
        "a_w": _f(rng.standard_normal((8, 2, 3, 3)) * 0.3),
        "b_w": _f(rng.standard_normal((8, 8, 3, 3)) * 0.2),
        "zeros": _f(np.zeros(8)),
        "fc_w": _f(rng.standard_normal((10, 8)) * 0.3), "fc_b": _f(rng.random(10) * .1),
    }
    for k in dead:
        inits[f"{k}_w"][:2] = 0
    p1 = dict(pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "zeros"], ["a"], name="a", **p1),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "b_w", "zeros"], ["b"], name="b", **p1),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("GlobalAveragePool", ["rb"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, inits, (2, 6, 6))


def refused_net(rng):
    """Channel-axis ops the analysis must refuse, one per branch of x(2,6,6), each with its
    reason: a Pad of the channels (conv a), a Slice with step 2 (conv c), a Resize scaling
    the channels (conv e), a Reshape into blocks of 4 across two groups (Concat of convs f
    and g), a Split through one channel's flattened features (conv h). Each branch ends in a
    conv whose channels stay prunable, pooled and concatenated into a Gemm 10."""
    shapes = {"a": (6, 2), "a2": (4, 8), "c": (6, 2), "c2": (4, 3), "e": (4, 2), "e2": (4, 8),
              "f": (6, 2), "g": (2, 2), "h2": (4, 8), "h": (3, 2)}
    inits = {f"{k}_w": _f(rng.standard_normal((m, n, 1, 1)) * 0.3)
             for k, (m, n) in shapes.items()}
    inits.update({
        "fc_w": _f(rng.standard_normal((10, 16 + 108)) * 0.1), "fc_b": _f(rng.random(10) * .1),
        "channel_pads": _c([0, 1, 0, 0, 0, 1, 0, 0]),
        "starts": _c([0]), "ends": _c([6]), "axes": _c([1]), "steps": _c([2]),
        "scales": _f([1, 2, 1, 1]),
        "blocks": _c([-1, 2, 4, 6, 6]), "unblocks": _c([-1, 8, 6, 6]),
        "split": _c([50, 58]),
    })
    nodes = [conv(k, "x", f"{k}_w") for k in ("a", "c", "e", "f", "g", "h")]
    nodes += [
        helper.make_node("Pad", ["a", "channel_pads"], ["pa"], name="pad_channels"),
        conv("a2", "pa", "a2_w"),
        helper.make_node("Slice", ["c", "starts", "ends", "axes", "steps"], ["sc"],
                         name="slice_step"),
        conv("c2", "sc", "c2_w"),
        helper.make_node("Resize", ["e", "", "scales"], ["re"], name="resize_channels",
                         mode="nearest"),
        conv("e2", "re", "e2_w"),
        helper.make_node("Concat", ["f", "g"], ["fg"], name="cat_fg", axis=1),
        helper.make_node("Reshape", ["fg", "blocks"], ["fg_blocks"], name="blocks"),
        helper.make_node("Reshape", ["fg_blocks", "unblocks"], ["fg_back"], name="unblocks"),
        conv("h2", "fg_back", "h2_w"),
        helper.make_node("Flatten", ["h"], ["h_flat"], name="flatten_h"),
        helper.make_node("Split", ["h_flat", "split"], ["h0", "h1"], name="split_features",
                         axis=1),
    ]
    pooled = []
    for k in ("a2", "c2", "e2", "h2"):
        nodes += [helper.make_node("GlobalAveragePool", [k], [f"{k}_gap"], name=f"{k}_gap"),
                  helper.make_node("Flatten", [f"{k}_gap"], [f"{k}_flat"], name=f"{k}_flat")]
        pooled.append(f"{k}_flat")
    nodes += [
        helper.make_node("Concat", [*pooled, "h0", "h1"], ["features"], name="features",
                         axis=1),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, inits, (2, 6, 6))


def kill_channels(graph, group, channels):
    """Zero every producing parameter of ``channels`` of ``group`` (a dependency-graph
    group), in place: with activations that keep 0 at 0 the channels then contribute
    nothing, so removing them must leave the outputs exactly as they are."""
    sizes = {gid: g.size for gid, g in graph.groups.items()}
    for s in group.producers:
        array = np.array(s.value.const_value.numpy())
        offset = 0
        for seg in s.layout:
            if seg.group == group.id:
                for c in channels:
                    index = [slice(None)] * array.ndim
                    start = offset + c * seg.block
                    index[s.axis] = slice(start, start + seg.block)
                    array[tuple(index)] = 0
            offset += sizes[seg.group] * seg.block
        s.value.const_value = ir.tensor(array, name=s.value.name)
